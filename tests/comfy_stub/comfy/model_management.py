"""Stand-in for comfy.model_management: a CPU host with an interrupt flag."""

import torch

interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return False


def soft_empty_cache(force=False):
    pass


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


freed = []


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def minimum_inference_memory():
    return 1024 * 1024 * 1024


def free_memory(memory_required, device, keep_loaded=[]):
    freed.append((memory_required, device))


free_memory_bytes = 64 * 1024**3
"""What get_free_memory reports (psutil's available RAM on a real CPU host); tests lower it."""


def get_free_memory(dev=None, torch_free_too=False):
    return (free_memory_bytes, free_memory_bytes) if torch_free_too else free_memory_bytes
