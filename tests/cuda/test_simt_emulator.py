"""The SIMT emulator's own checks: barriers, shuffles, atomics, divergence, and that ThreadSanitizer
catches a missing __syncthreads() (so a clean TSan run of the kernels means something)."""


def test_barriers_shuffles_atomics_and_poisoned_shared_memory(emu):
    res = emu.run("selftest")
    assert "selftest ok" in res.stdout


def test_a_thread_leaving_before_a_barrier_aborts_with_a_message(emu):
    res = emu.run("divergent", check=False, timeout=120)
    assert res.returncode != 0
    assert "divergent barrier" in res.stderr


def test_thread_sanitizer_reports_the_planted_race(emu_tsan):
    res = emu_tsan.run("race", check=False, timeout=300)
    assert "WARNING: ThreadSanitizer: data race" in res.stderr, res.stderr[-2000:]
    assert "neighbour_read_kernel<false>" in res.stderr
    assert res.returncode == 66


def test_the_same_kernel_with_its_barrier_is_clean_under_thread_sanitizer(emu_tsan):
    emu_tsan.run("norace", timeout=300)
