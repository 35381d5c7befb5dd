"""The decode layout and its kernel give bitsandbytes' 4-bit product."""

import pytest
import torch

from htmlgen_utils.packing import build_prompt
from tests.models import adapted_tiny_model


def test_every_tile_the_tuner_may_pick_computes_the_four_bit_product(tmp_path):
    """The decode layout (eight codes a word, the words of one input for all outputs contiguous) and its Triton
    kernel (in Triton's CPU interpreter) give one token's product with bitsandbytes' dequantised weights, to
    float32 rounding, with every tile the autotuner may pick (it picks by speed, so each must be right) for input
    sizes 320, 704 (the tiny base's `down_proj`: 11 blocks of 64), 4096 and 11008 (Llama-2-7B's), 72 outputs
    (a partial tile), the rows re-laid 64 at a time. A tile whose inputs do not divide the row (128 at 704 or 320)
    would drop the last 64 inputs; a code in the wrong nibble or an absmax of the wrong block would be far off."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import bitsandbytes as bnb
        import torch
        from htmlgen_utils.levers.column_words import CONFIGS, _kernel, _tuned, column_words, grid, tiles_for
        from htmlgen_utils.levers.stacking import unnested_absmax

        torch.manual_seed(0)
        rows = 72
        tuned = _tuned()
        for cols in (320, 704, 4096, 11008):
            pruned = tuned.early_config_prune(tuned.configs, {"cols": cols})
            tiles = sorted((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in pruned)
            assert tiles == sorted(tiles_for(cols))
            weight = bnb.nn.Params4bit(torch.randn(rows, cols) * 0.02, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)
            weight._quantize("cpu")
            state = weight.quant_state
            x = torch.randn(cols, dtype=torch.float16)
            expected = bnb.functional.dequantize_4bit(weight.data, state).float() @ x.float()
            words, absmax = column_words(weight.data, unnested_absmax(state), rows, cols, codes_at_once=64 * cols)
            for block_n, block_k in sorted({tile[:2] for tile in tiles_for(cols)}):  # warps: no matter here
                out = torch.zeros(rows)
                _kernel()[grid(rows, cols, block_n, block_k)](x, words, absmax, state.code.float(), out, rows, cols,
                                                              BLOCK_N=block_n, BLOCK_K=block_k, ASM="")
                print(cols, block_k, ((out - expected).abs().max() / expected.abs().max()).item())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = {
        (int(cols), int(block_k)): float(error) for cols, block_k, error in map(str.split, done.stdout.splitlines())
    }
    assert {cols for cols, _ in errors} == {320, 704, 4096, 11008} and {k for _, k in errors} == {16, 32, 64, 128}
    assert max(errors.values()) < 1e-5, errors


def test_decoding_over_the_column_words_layout_writes_the_same_pages(monkeypatch):
    """`decode_one` (`column_words=True`, the default from compute capability 8.0): every group of the step gets
    the decode layout and its one-token products read it (here through the op's CPU form, the same sums in tensor
    operations; on CUDA the Triton kernel), and the pages are those of the step over bitsandbytes' layout
    (`column_words=False`), with the adapter mattering. The layout is what ran: with its absmax doubled the pages
    change, and the other step's do not. The custom op passes torch's op checks (its shape-only form is what the
    compiler traces)."""
    from htmlgen_utils.levers import column_words
    from htmlgen_utils.levers.decoding import decode_one

    monkeypatch.setattr(
        column_words.ColumnWords,
        "fits",  # the layout is built on CUDA only; here on CPU too
        staticmethod(lambda packed, state: column_words.ColumnWords.fits_format(state)),
    )
    model, tokenizer = adapted_tiny_model()
    ids = tokenizer(build_prompt("A modern landing page for Acme in blue"), return_tensors="pt").input_ids
    plain = list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False))
    groups = model.__dict__["_htmlgen_shared_inputs"]
    assert all(group.columns is None for group in groups)  # asked not to, nothing is built
    ours = list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=True))
    assert ours == plain
    assert len(groups) == 4 * model.config.num_hidden_layers and all(group.columns is not None for group in groups)
    with model.disable_adapter():
        assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False)) != plain
    for group in groups:
        group.columns.absmax *= 2
    assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=True)) != plain
    assert list(decode_one(model, tokenizer, ids, 120, stop_at_html_end=False, column_words=False)) == plain
    # the op as the compiled step traces it: schema, fake (shape-only) form and real form agree
    group = groups[0]
    x = torch.randn(1, 1, group.columns.words.shape[0] * 8, dtype=torch.float16)
    out = torch.zeros(group.columns.rows)
    checks = torch.library.opcheck(
        column_words._nf4_column_words_add, (out, x, group.columns.words, group.columns.absmax, group.columns.table, "")
    )
    assert set(checks.values()) == {"SUCCESS"}, checks


def _run_ptx(asm: str, word: int) -> list[int]:
    """Run the few PTX instructions `prmt_lookup_asm` writes (mov, shl, shr, and, prmt, lop3, cvt) on one 32-bit
    word, as the PTX manual defines them; returns the eight outputs' fp16 bits (before the conversion to
    float32, which is exact)."""
    registers = {"$8": word}

    def value(operand: str) -> int:
        return registers[operand] if operand in registers else int(operand, 0)

    def prmt(a: int, b: int, select: int) -> int:  # byte i of the result: byte (select nibble i & 7) of {b, a},
        source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):  # or, with the nibble's top bit set, that byte's sign replicated
            nibble = (select >> 4 * i) & 0xF
            byte = source[nibble & 7]
            out |= ((0xFF if byte & 0x80 else 0) if nibble & 8 else byte) << 8 * i
        return out

    def lop3(a: int, b: int, c: int, table: int) -> int:  # bit j: table's bit (a_j b_j c_j) read as a number
        return sum(((table >> ((a >> j & 1) << 2 | (b >> j & 1) << 1 | (c >> j & 1))) & 1) << j for j in range(32))

    for line in asm.splitlines():
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(" ", 1)
        args = [arg.strip() for arg in rest.replace("{", "").replace("}", "").split(",")]
        if op == "mov.b32" and len(args) == 3:  # unpack a register's two halves
            registers[args[0]], registers[args[1]] = value(args[2]) & 0xFFFF, value(args[2]) >> 16
        elif op == "mov.b32":
            registers[args[0]] = value(args[1])
        elif op == "shl.b32":
            registers[args[0]] = (value(args[1]) << value(args[2])) & 0xFFFFFFFF
        elif op == "shr.u32":
            registers[args[0]] = value(args[1]) >> value(args[2])
        elif op == "and.b32":
            registers[args[0]] = value(args[1]) & value(args[2])
        elif op == "prmt.b32":
            registers[args[0]] = prmt(value(args[1]), value(args[2]), value(args[3]))
        elif op == "lop3.b32":
            registers[args[0]] = lop3(value(args[1]), value(args[2]), value(args[3]), value(args[4]))
        elif op == "cvt.f32.f16":
            registers[args[0]] = value(args[1])
        else:
            raise AssertionError(f"an instruction the test does not know: {line}")
    return [registers[f"${i}"] for i in range(8)]


def test_column_words_lookup_in_registers_gives_the_nf4_table():
    """The PTX that looks a word's eight codes up in registers (the GPU kernel's lookup; Triton's interpreter
    cannot run it), executed instruction by instruction as the PTX manual defines them, gives each code's NF4
    value in fp16, for every code in every position of the word. A wrong byte select, mask or half would give
    another code's value."""
    import random

    import bitsandbytes.functional as F

    from htmlgen_utils.levers.column_words import prmt_lookup_asm

    table = F.get_4bit_type("nf4", device="cpu").float()
    fp16_bits = [int(b) & 0xFFFF for b in table.half().view(torch.int16).tolist()]
    asm = prmt_lookup_asm(table)
    rng = random.Random(0)
    words = [[(code + shift) % 16 for shift in range(8)] for code in range(16)]  # every code in every position
    words += [[rng.randrange(16) for _ in range(8)] for _ in range(200)]
    for codes in words:
        word = sum(code << 4 * j for j, code in enumerate(codes))
        assert _run_ptx(asm, word) == [fp16_bits[code] for code in codes], codes
