"""Helpers of the lite tools: calibration data (`calib_dataloader`), decoder layers brought to
the device one at a time (`memory_efficient`) and config.ini edits (`workspace_config`)."""
