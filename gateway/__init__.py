"""Gateway side of vgate: configuration, CLI, and the aiohttp app (predict, health, metrics)."""
