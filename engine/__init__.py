"""Engine side of vgate: devices and placement, vLLM worker arguments, model sources."""
