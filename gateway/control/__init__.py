"""Process control: the `vgate` command, checks before start, supervisord, the monitor, nginx."""
