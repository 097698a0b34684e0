"""Chat with a Hugging Face checkpoint on plain PyTorch (transformers), optionally split over
several processes with DeepSpeed AutoTP tensor parallelism.

    python -m lmdeploy.pytorch.chat MODEL_PATH [--model_name NAME] [--temperature 0] ...
    deepspeed --module --num_gpus 2 lmdeploy.pytorch.chat MODEL_PATH ...

Modules:

* `chat`: the command line (flag checking, model loading, the console loop);
* `session`: one conversation (chat template, KV cache kept between turns, sampling, streaming)
  and the `config set` settings;
* (the console reader and flag checks are shared: `lmdeploy.console`);
* `parallel`: the process group, DeepSpeed AutoTP and broadcasting rank 0's input.

Nothing here is imported by `import lmdeploy`; torch and transformers load only when a model does.
"""
