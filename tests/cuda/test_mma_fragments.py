"""The emulator's tensor-core operations (cuda/mma.cuh) against the PTX ISA's fragment layouts, lane by lane.

The layouts below are written from the ISA's element-index formulas ("Matrix Fragments for mma.m16n8k16 with
floating point type": a_i, b_i, c_i with groupID = lane >> 2 and threadID_in_group = lane % 4; "ldmatrix":
lanes 8m .. 8m+7 address matrix m's rows, each lane gets two consecutive elements of row lane / 4, or with
.trans of column lane / 4), independently of how simt_emu.h rebuilds the operands.
"""
import numpy as np
import pytest
import torch

DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}


def write_args(path, **args):
    path.write_text("".join(f"{k} {v}\n" for k, v in args.items()))


def a_coords(lane):
    """(row, col) of A elements a0..a7 held by `lane` (two per register, register r holds a_{2r}, a_{2r+1})."""
    g, t = lane >> 2, lane % 4
    return [(g if (i < 2 or 4 <= i < 6) else g + 8, 2 * t + (i & 1) + (8 if i >= 4 else 0)) for i in range(8)]


def b_coords(lane):
    g, t = lane >> 2, lane % 4
    return [(2 * t + (i & 1) + (8 if i >= 2 else 0), g) for i in range(4)]


def c_coords(lane):
    g, t = lane >> 2, lane % 4
    return [(g + (8 if i >= 2 else 0), 2 * t + (i & 1)) for i in range(4)]


def bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def pack(lo: int, hi: int) -> int:
    return int(lo) | (int(hi) << 16)


def fragments(A, B):
    """Per-lane registers of A (32, 4) and B (32, 2) as the ISA lays them out."""
    a16, b16 = bits(A), bits(B)
    af = np.zeros((32, 4), np.uint32)
    bf = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        ac, bc = a_coords(lane), b_coords(lane)
        for r in range(4):
            af[lane, r] = pack(a16[ac[2 * r]], a16[ac[2 * r + 1]])
        for r in range(2):
            bf[lane, r] = pack(b16[bc[2 * r]], b16[bc[2 * r + 1]])
    return af, bf


def run_fragments(emu, tmp_path, dtype, A, B, C):
    (tmp_path / "a.bin").write_bytes(bits(A).tobytes())
    (tmp_path / "b.bin").write_bytes(bits(B).tobytes())
    (tmp_path / "bt.bin").write_bytes(bits(B.t()).tobytes())
    (tmp_path / "c.bin").write_bytes(C.contiguous().numpy().tobytes())
    af, bf = fragments(A, B)
    (tmp_path / "afrag.bin").write_bytes(af.tobytes())
    (tmp_path / "bfrag.bin").write_bytes(bf.tobytes())
    write_args(tmp_path / "args.txt", dtype=DTYPE_CODE[dtype])
    emu.run("fragments", tmp_path)
    ld = np.frombuffer((tmp_path / "ldmatrix.bin").read_bytes(), np.uint32).reshape(32, 14)
    dfrag = np.frombuffer((tmp_path / "d_frag.bin").read_bytes(), np.float32).reshape(32, 4)
    dsmem = np.frombuffer((tmp_path / "d_smem.bin").read_bytes(), np.float32).reshape(2, 16, 8)
    return ld, dfrag, dsmem


def operands(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    return A, B, C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ldmatrix_gives_every_lane_the_isa_elements(emu, tmp_path, dtype):
    ld, _, _ = run_fragments(emu, tmp_path, dtype, *operands(dtype))

    def ident(m, r, c):  # the kernel stores element (m, r, c) of the four 8 x 8 matrices as 64 m + 8 r + c
        return 64 * m + 8 * r + c

    offset = 0
    for x in (1, 2, 4):
        for trans in (False, True):
            for lane in range(32):
                for m in range(x):
                    if trans:
                        want = pack(ident(m, 2 * (lane % 4), lane // 4), ident(m, 2 * (lane % 4) + 1, lane // 4))
                    else:
                        want = pack(ident(m, lane // 4, 2 * (lane % 4)), ident(m, lane // 4, 2 * (lane % 4) + 1))
                    got = int(ld[lane, offset + m])
                    assert got == want, f"x{x}{'.trans' if trans else ''} lane {lane} register {m}: {got:#x} != {want:#x}"
            offset += x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_fragments_lane_by_lane_against_a_matrix_product(emu, tmp_path, dtype):
    A, B, C = operands(dtype, seed=1)
    _, dfrag, _ = run_fragments(emu, tmp_path, dtype, A, B, C)
    want = A.double() @ B.double() + C.double()
    for lane in range(32):
        for i, (r, c) in enumerate(c_coords(lane)):
            # products of 16-bit values are exact in fp32; 16 fp32 additions round
            assert abs(dfrag[lane, i] - want[r, c].item()) <= 1e-5 * (1 + abs(want[r, c].item())), (lane, i, r, c)


def test_mma_fragments_see_each_element_once(emu, tmp_path):
    """One-hot operands: D's element (r, c) is 1 exactly where the ISA puts A[r, k] and B[k, c] for one k."""
    dtype = torch.bfloat16
    for k in (0, 5, 8, 15):
        A = torch.zeros(16, 16, dtype=dtype)
        A[:, k] = torch.arange(1, 17, dtype=dtype)
        B = torch.zeros(16, 8, dtype=dtype)
        B[k] = torch.arange(1, 9, dtype=dtype) * 32
        _, dfrag, dsmem = run_fragments(emu, tmp_path, dtype, A, B, torch.zeros(16, 8))
        want = (A.float() @ B.float()).numpy()
        got = np.zeros((16, 8), np.float32)
        for lane in range(32):
            for i, (r, c) in enumerate(c_coords(lane)):
                got[r, c] = dfrag[lane, i]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(dsmem[0], want)
        np.testing.assert_array_equal(dsmem[1], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ldmatrix_operands_from_shared_memory_multiply_like_torch(emu, tmp_path, dtype):
    """A by ldmatrix.x4, B n-major by ldmatrix.x2 and k-major by ldmatrix.x2.trans, loaded by cp.async."""
    A, B, C = operands(dtype, seed=2)
    _, _, dsmem = run_fragments(emu, tmp_path, dtype, A, B, C)
    want = (A.double() @ B.double()).numpy()
    np.testing.assert_allclose(dsmem[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dsmem[1], want, rtol=1e-5, atol=1e-5)
