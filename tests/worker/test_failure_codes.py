"""A job's error code comes from the exception the stage raised: each is raised for real here, not built by hand
where the real call can raise it."""

from __future__ import annotations

import errno
import mmap
import resource

import pytest
import torch

from models.errors import InvalidRequest
from worker.stage_kit import classify_failure


def raised(call) -> BaseException:
    with pytest.raises(BaseException) as info:
        call()
    return info.value


def test_a_user_mistake_is_a_user_error_that_names_the_field():
    error = classify_failure(InvalidRequest("max_seq_len must be at most 4096.", param="max_seq_len"))
    assert error == {
        "code": "invalid_request",
        "message": "max_seq_len must be at most 4096.",
        "param": "max_seq_len",
        "type": "user_error",
    }


def test_torch_refusing_an_allocation_is_out_of_memory():
    error = classify_failure(raised(lambda: torch.empty(2**50, dtype=torch.uint8)))
    assert error["code"] == "out_of_memory" and error["type"] == "system_error"
    assert "memory" in error["message"]


def test_a_syscall_refused_memory_is_out_of_memory():
    """An address-space limit makes mmap fail with ENOMEM, as a cgroup's kernel-memory limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, hard))
    try:
        exc = raised(lambda: mmap.mmap(-1, 128 * 2**30))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert isinstance(exc, OSError) and exc.errno == errno.ENOMEM
    error = classify_failure(exc)
    assert error["code"] == "out_of_memory" and error["type"] == "system_error"


def test_python_memory_error_is_out_of_memory():
    error = classify_failure(raised(lambda: bytearray(2**62)))
    assert error["code"] == "out_of_memory"


def test_a_full_disk_is_storage_full_and_names_the_file(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "adapter.tar"))
    error = classify_failure(full)
    assert error["code"] == "storage_full" and str(tmp_path / "adapter.tar") in error["message"]


def test_anything_else_is_an_internal_error_with_its_type():
    error = classify_failure(raised(lambda: {}["missing"]))
    assert error == {"code": "internal_error", "message": "KeyError: 'missing'", "param": None, "type": "system_error"}
