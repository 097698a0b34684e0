"""Tensor parallel on the lent machine: with fewer GPUs than ranks the start is one clear error
(the multi-GPU runs need a machine with several GPUs). Skips without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def test_more_ranks_than_gpus_fails_before_any_process_starts():
    from lmdeploy.turbomind import TurboMind
    from lmdeploy.turbomind.config import ConfigError
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf'tp={n + 1} needs {n + 1} GPUs from cuda:0 on; '
                                          rf'{n} visible'):
        TurboMind(dummy='tiny', tp=n + 1, device='cuda:0', num_blocks=16)
