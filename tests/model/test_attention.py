"""loraforge.model.attention: decoding on CUDA runs without SDPA's cuDNN backend (it builds a plan per new
key length), other devices and an explicit request keep torch's choice; the choice is undone on exit."""

import torch

from loraforge.model.attention import decode_attention


def test_decoding_leaves_cudnn_attention_out_on_cuda_only():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    assert before  # torch allows it by default: the check below can fail
    with decode_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    for device, cudnn in ((torch.device("cpu"), False), ("cuda", True)):
        with decode_attention(device, cudnn):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before
