"""int8 KV-cache quantization: observers of K/V (`observer`), the scale/zero-point formulas
(`qparams`), the calibration run (`calibration`) and the scale files (`scale_files`)."""
