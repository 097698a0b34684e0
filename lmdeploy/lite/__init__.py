"""Model compression tools (LMDeploy v0.0.2's `lmdeploy.lite`).

* `apis.kv_qparams`: `python -m lmdeploy.lite.apis.kv_qparams`, int8 KV-cache calibration;
* `quantization`: K/V observers, the qparams formulas and the scale files they go into;
* `utils`: calibration data (`calib_dataloader`) and layer offload (`memory_efficient`);
* `data/calib_corpus.txt`: the calibration text shipped with the package (see data/README.md).

Nothing here is imported by `import lmdeploy`; torch and transformers load only when used.
"""
