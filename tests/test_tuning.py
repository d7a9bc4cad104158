"""Tuning tables (pallas_kernels.tuning): lookup by device kind and shape, the row buckets of
the quantized matmul, bad tables, and the packaged table's entries."""

import dataclasses
import json
import os
import sys
import time

import pytest

from pallas_kernels import tuning
from pallas_kernels.quant_matmul import (QuantMatmulConfig, TUNED_ROWS, tuned_rows,
                                         tuning_key)

DEV = "Test GPU 80GB"
TUNED = QuantMatmulConfig(block_m=1, block_n=128, block_k=512, split_k=4, num_warps=8,
                          num_stages=4, fma=True)


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = str(tmp_path / "quant_matmul.json")
    tuning.write_entries(path, "quant_matmul", [
        dict(device=DEV, key=tuning_key(1, 4096, 28672, 4, 128),
             config=dataclasses.asdict(TUNED), us=40.0),
        dict(device=DEV, key=tuning_key(16, 4096, 28672, 4, 128),
             config=dataclasses.asdict(QuantMatmulConfig(block_m=16, block_n=256, block_k=128,
                                                         split_k=8, joined=True)))])
    monkeypatch.setenv(tuning.ENV, path)
    return path


def test_rows_buckets():
    assert [tuned_rows(m) for m in (0, 1, 2, 16, 17, 64, 65, 256, 257, 512, 513, 2048,
                                    5000)] == \
        [1, 1, 16, 16, 64, 64, 256, 256, 512, 512, 2048, 2048, 2048]
    assert set(tuned_rows(m) for m in range(1, 3000)) == set(TUNED_ROWS)


def test_lookup_takes_the_entry_of_the_device_and_shape(table):
    cfg = QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, bits=4, device=DEV)
    assert cfg == TUNED
    # 2..16 rows share the 16-row entry; one row never takes it
    for M in (2, 9, 16):
        cfg = QuantMatmulConfig.for_shape("cuda", M, 4096, 28672, 128, bits=4, device=DEV)
        assert cfg.joined and cfg.split_k == 8 and cfg.block_n == 256
    rules = QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128)
    assert rules != TUNED
    # another device, bits, group size, shape or row bucket: the rules
    for kw in (dict(device="Other GPU"), dict(device=None), dict(device=DEV, bits=8)):
        assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128,
                                           **kw) == rules
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, -1, device=DEV) == \
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, -1)
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 4096, 128, device=DEV) == \
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 4096, 128)
    assert QuantMatmulConfig.for_shape("cuda", 64, 4096, 28672, 128, device=DEV) == \
        QuantMatmulConfig.for_shape("cuda", 64, 4096, 28672, 128)


def test_off_turns_tables_off(table, monkeypatch):
    monkeypatch.setenv(tuning.ENV, "off")
    assert tuning.table_paths("quant_matmul") == []
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV) == \
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128)


def test_directory_and_first_match(tmp_path, table, monkeypatch):
    first = tmp_path / "first"
    first.mkdir()
    other = dataclasses.replace(TUNED, block_n=64)
    tuning.write_entries(str(first / "quant_matmul.json"), "quant_matmul", [
        dict(device=DEV, key=tuning_key(1, 4096, 28672, 4, 128),
             config=dataclasses.asdict(other))])
    monkeypatch.setenv(tuning.ENV, os.pathsep.join([str(first), table]))
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV) == other


def test_missing_path_in_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV, str(tmp_path / "nowhere.json"))
    with pytest.raises(ValueError, match="OPTGQA_TUNING.*nowhere.json.*neither"):
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV)
    # a directory without this kernel's table is fine: the packaged table and the rules apply
    monkeypatch.setenv(tuning.ENV, str(tmp_path))
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV) == \
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128)


def test_write_entries_replaces_same_key(table):
    new = dataclasses.replace(TUNED, split_k=2)
    tuning.write_entries(table, "quant_matmul", [
        dict(device=DEV, key=tuning_key(1, 4096, 28672, 4, 128), config=dataclasses.asdict(new))])
    entries = json.load(open(table))["entries"]
    assert len(entries) == 2
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV) == new


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"kernel": "quant_matmul"}', "'entries' list"),
    ('{"kernel": "flash", "entries": []}', "is for kernel 'flash'"),
    ('{"entries": [{"device": "x", "key": 3, "config": {}}]}', "entry 0 needs"),
])
def test_bad_table_names_the_file(tmp_path, monkeypatch, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    monkeypatch.setenv(tuning.ENV, str(path))
    with pytest.raises(ValueError, match=match) as e:
        QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV)
    assert str(path) in str(e.value)


def test_bad_entry_config_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "t.json")
    key = tuning_key(1, 4096, 28672, 4, 128)
    for config, match in ((dict(block_q=4), "unexpected keyword"),
                          (dict(block_m=1, fma=False), "block_m")):
        tuning.write_entries(path, "quant_matmul", [dict(device=DEV, key=key, config=config)])
        monkeypatch.setenv(tuning.ENV, path)
        with pytest.raises(ValueError, match=f"tuning table entry.*{match}"):
            QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV)


def test_packaged_tables_hold_valid_configs():
    """Every entry of every table shipped with the package builds a valid config."""
    names = [n for n in os.listdir(tuning.PACKAGED_DIR) if n.endswith(".json")] \
        if os.path.isdir(tuning.PACKAGED_DIR) else []
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig
    kinds = {"quant_matmul.json": (QuantMatmulConfig, {"bits", "group_size", "K", "N", "M"}),
             "bsr_quant_matmul.json": (BSRMatmulConfig,
                                       {"bits", "group_size", "K", "N", "row_blocks", "M"})}
    for name in names:
        assert name in kinds, f"{name}: no kernel reads this table"
        cls, fields = kinds[name]
        entries = tuning.load_table(os.path.join(tuning.PACKAGED_DIR, name), name[:-5])
        assert entries, name
        for e in entries:
            assert set(e["key"]) == fields
            assert e["key"]["M"] in TUNED_ROWS
            cls(**e["config"]).validate()
            if name == "quant_matmul.json" and e["key"]["M"] > 64:
                # above 64 rows an entry only counts with the dequantize route timed beside it
                assert 0 < e["us"] < e["dequantize_us"], e["key"]


def test_bsr_tiles_come_from_the_table(tmp_path, monkeypatch):
    """BSRMatmulConfig.for_shape takes the entry of the same device, shape and blocks per row;
    elsewhere the rules; a bad entry is refused naming the kernel."""
    from pallas_kernels.bsr_quant_matmul import BSRMatmulConfig, tuning_key as bsr_key
    path = str(tmp_path / "bsr_quant_matmul.json")
    tuned = dict(block_t=128, block_m=1, num_warps=8, num_stages=2, runtime_magic=True,
                 row_aligned=True)
    tuning.write_entries(path, "bsr_quant_matmul", [dict(
        device=DEV, key=bsr_key(1, 4096, 6144, 4, 128, 16), config=tuned)])
    monkeypatch.setenv(tuning.ENV, str(tmp_path))
    kw = dict(K=4096, N=6144, bits=4, group_size=128)
    got = BSRMatmulConfig.for_shape("cuda", 1, 98304, row_blocks=16, device=DEV, **kw)
    assert got == BSRMatmulConfig(**tuned)      # fields the entry omits keep their defaults
    rules = BSRMatmulConfig.for_shape("cuda", 1, 98304, row_blocks=16, **kw)
    assert rules.block_t == 64 and rules.num_warps == 4
    for other in (dict(device="Other GPU", row_blocks=16), dict(device=DEV, row_blocks=15),
                  dict(device=DEV, row_blocks=16, K=8192)):
        assert BSRMatmulConfig.for_shape("cuda", 1, 98304, **dict(kw, **other)) == rules
    tuning.write_entries(path, "bsr_quant_matmul", [dict(
        device=DEV, key=bsr_key(1, 4096, 6144, 4, 128, 16), config=dict(block_m=32))])
    with pytest.raises(ValueError, match="bsr_quant_matmul tuning table entry.*block_m"):
        BSRMatmulConfig.for_shape("cuda", 1, 98304, row_blocks=16, device=DEV, **kw)


def test_tune_quant_split_variants_and_table_entries():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import tune_quant as T
    cfg = QuantMatmulConfig(block_m=1, block_n=64, block_k=256, split_k=2, num_warps=8,
                            fma=True)
    # gate_up at one row: 448 column tiles; 1..16 programs per SM of 132 = splits 1..4, and
    # one K step per program (16)
    splits = [c.split_k for c in T.split_variants(cfg, 1, 4096, 28672)]
    assert splits == [1, 4, 16]
    res = dict(device=DEV, commit="abc1234", cases=[
        dict(M=1, K=4096, N=28672, format="w4g128", bf16_us=80.0,
             default=dict(us=45.0), best=dict(us=40.0, config=dataclasses.asdict(TUNED))),
        dict(M=16, K=4096, N=28672, format="w4g128", bf16_us=80.0,     # within 2%: rules stay
             default=dict(us=45.0), best=dict(us=44.5, config=dataclasses.asdict(TUNED)))])
    entries = T.table_entries(res, "test")
    assert len(entries) == 1 and entries[0]["key"] == tuning_key(1, 4096, 28672, 4, 128)
    assert entries[0]["config"] == dataclasses.asdict(TUNED) and entries[0]["device"] == DEV


def test_tune_quant_confirm_case_uses_interleaved_medians():
    """tune_quant.confirm_case on a fake timer: the three fastest distinct tiles of the search
    and the rules' tiles are timed with bfloat16 in turn; the lowest median wins, and the case
    then carries the medians of bfloat16 and of the rules' tiles."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import tune_quant as T
    mk = lambda bn, nw: QuantMatmulConfig(block_m=1, block_n=bn, block_k=256, split_k=2,  # noqa: E731
                                          num_warps=nw, fma=True)
    a, b, c, d = mk(64, 4), mk(128, 4), mk(64, 8), mk(256, 8)
    rules = mk(32, 4)
    case = dict(bf16_us=70.0, default=dict(config=dataclasses.asdict(rules), us=60.0),
                tried=[dict(config=dataclasses.asdict(x), us=u)
                       for x, u in ((a, 30.0), (b, 31.0), (a, 33.0), (c, 32.0), (d, 40.0))]
                + [dict(config=dataclasses.asdict(d), error="boom")])
    real = {"bf16": [80, 78, 90], a: [36, 35, 50], b: [33, 34, 33], c: [40, 31, 41],
            rules: [45, 44, 46]}
    order = []
    bf16_sets = object()   # the fake timer tells the bfloat16 product by its argument sets

    def timer(f, sets):
        key = "bf16" if sets is bf16_sets else f.key
        order.append(key)
        return real[key][sum(1 for k in order if k == key) - 1] * 1e-6

    def matmul_fn(cfg):
        f = lambda *args: None  # noqa: E731
        f.key = cfg
        return f

    t, cfg, t_bf16 = T.confirm_case(case, rules, timer, matmul_fn, None, bf16_sets, rounds=3)
    assert cfg == b and t == pytest.approx(33e-6)
    assert t_bf16 == pytest.approx(80e-6) and case["bf16_us"] == pytest.approx(80.0)
    assert case["bf16_search_us"] == 70.0
    assert case["default"]["us"] == pytest.approx(45.0) and case["default"]["search_us"] == 60.0
    assert order[:5] == ["bf16", a, b, c, rules] and len(order) == 15 and d not in order
    assert case["confirm"]["rounds"] == 3
    assert [s["us"] for s in case["confirm"]["settings"]][0] == pytest.approx([36, 35, 50])


BIG = QuantMatmulConfig(block_m=256, block_n=128, block_k=128, split_k=2, num_warps=8,
                        joined=True, dequant_tiles=True)


def test_fused_measured_faster_reads_the_entry_times(tmp_path, monkeypatch):
    """Above 64 rows the fused kernel is taken only where the row bucket's entry was timed
    faster than the dequantize route in the same run."""
    from pallas_kernels.quant_matmul_config import fused_measured_faster
    path = str(tmp_path / "quant_matmul.json")
    big = dataclasses.asdict(BIG)
    tuning.write_entries(path, "quant_matmul", [
        dict(device=DEV, key=tuning_key(512, 4096, 28672, 4, 128), config=big, us=150.0,
             dequantize_us=190.0),
        dict(device=DEV, key=tuning_key(256, 4096, 28672, 4, 128), config=big, us=200.0,
             dequantize_us=190.0),
        dict(device=DEV, key=tuning_key(256, 4096, 4096, 4, 128), config=big, us=20.0)])
    monkeypatch.setenv(tuning.ENV, path)
    assert fused_measured_faster(DEV, 300, 4096, 28672, 4, 128)        # bucket 512: faster
    assert fused_measured_faster(DEV, 512, 4096, 28672, 4, 128)
    assert not fused_measured_faster(DEV, 513, 4096, 28672, 4, 128)    # bucket 2048: none
    assert not fused_measured_faster(DEV, 200, 4096, 28672, 4, 128)    # slower than the route
    assert not fused_measured_faster(DEV, 200, 4096, 4096, 4, 128)     # no route time
    assert not fused_measured_faster("Other GPU", 300, 4096, 28672, 4, 128)
    assert not fused_measured_faster(None, 300, 4096, 28672, 4, 128)
    assert not fused_measured_faster(DEV, 300, 4096, 28672, 8, 128)
    # the tiles themselves come from the same entry
    assert QuantMatmulConfig.for_shape("cuda", 300, 4096, 28672, 128, device=DEV) == BIG


def test_quant_matmul_auto_route_above_64_rows_follows_the_table(tmp_path, monkeypatch):
    """quant.matmul(impl="auto") on a (pretended) GPU: at 300 rows the dequantize kernel and
    the float product, unless the table's 512-row bucket holds fused tiles timed faster."""
    import jax
    import jax.numpy as jnp
    from optgqa_jax import quant
    kdq = sys.modules["pallas_kernels.dequant"]         # the modules (the package's names of
    kqm = sys.modules["pallas_kernels.quant_matmul"]    # the same spelling are functions)
    from pallas_kernels import _common as kc

    K, N, M = 256, 128, 300
    ql = quant.synthetic.random_quantized_linear(jax.random.PRNGKey(0), K, N,
                                                 quant.parse_spec("w4g128"), "bfloat16")
    x = jnp.ones((M, K), jnp.bfloat16)
    called = []
    monkeypatch.setattr(kc, "backend", lambda: "cuda")
    monkeypatch.setattr(kc, "device_kind", lambda: DEV)
    monkeypatch.setattr(kqm, "quant_matmul", lambda x, *a, **k: called.append("fused")
                        or jnp.zeros((x.shape[0], N), x.dtype))
    monkeypatch.setattr(kdq, "dequantize_packed", lambda *a, **k: called.append("dequantize")
                        or jnp.zeros((K, N), jnp.bfloat16))
    path = str(tmp_path / "quant_matmul.json")
    tuning.write_entries(path, "quant_matmul", [])
    monkeypatch.setenv(tuning.ENV, path)
    quant.matmul(x, ql)
    assert called == ["dequantize"]                       # no entry (the packaged table: none
    #                                                       for this device)
    tuning.write_entries(path, "quant_matmul", [dict(
        device=DEV, key=tuning_key(M, K, N, 4, 128), config=dataclasses.asdict(BIG),
        us=10.0, dequantize_us=12.0)])
    quant.matmul(x, ql)
    assert called == ["dequantize", "fused"]
    quant.matmul(x[:64], ql)                              # up to 64 rows: always fused
    assert called[-1] == "fused"


def test_tune_quant_descent_moves_and_descend():
    """descent_moves: the register path's options flipped (half_pairs and raw_x exclusive),
    split/block_n halved and doubled within the shape, only valid configs; descend walks to
    the first neighbour faster by more than 2% until none is, timing each config once."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import tune_quant as T
    R = dataclasses.replace
    reg = QuantMatmulConfig(block_m=1, block_n=64, block_k=512, split_k=8, num_warps=4,
                            num_stages=4, fma=True, raw_x=True)
    moves = T.descent_moves(reg, 4096, 28672)
    assert R(reg, raw_x=False, half_pairs=True) in moves      # half_pairs turns raw_x off
    assert R(reg, runtime_magic=True) in moves and R(reg, raw_x=False) in moves
    assert R(reg, kernel_sums=True) in moves
    assert R(reg, wrapper_sums=True, kernel_sums=False) in T.descent_moves(
        R(reg, kernel_sums=True), 4096, 28672)                  # the sums options exclusive
    assert R(reg, split_k=4) in moves and R(reg, block_n=128) in moves
    assert R(reg, split_k=16) not in moves          # 16 x 512 rows > K = 4096
    assert R(reg, num_warps=8) in moves and R(reg, num_stages=1) in moves
    assert R(reg, block_k=256) in moves and R(reg, block_k=1024, split_k=4) in moves
    assert not any(c.block_k < 128 for c in T.descent_moves(R(reg, block_k=128), 4096, 28672))
    assert reg not in moves and len(set(moves)) == len(moves)
    for c in moves:
        c.validate()
    tc = QuantMatmulConfig(block_m=16, block_n=128, block_k=128, split_k=4)
    tmoves = T.descent_moves(tc, 4096, 28672)
    assert R(tc, shift_patterns=True) in tmoves
    assert not any(c.fma or c.runtime_magic for c in tmoves)
    # descent on a fake cost: runtime_magic saves 20%, then split 4 another 10%; a failing
    # config (None) is skipped; 1% gains do not move
    calls = []

    def cost(c):
        calls.append(c)
        if c.num_warps == 8:
            return None
        t = 40.0 * (0.8 if c.runtime_magic else 1.0) * (0.9 if c.split_k == 4 else 1.0)
        return (t * (0.99 if c.num_stages == 1 else 1.0)) * 1e-6
    t, best = T.descend([reg, R(reg, block_n=32)], cost, 4096, 28672, time.perf_counter() + 60)
    assert best == R(reg, runtime_magic=True, split_k=4) and t == pytest.approx(28.8e-6)
    assert len(calls) == len(set(calls))
    # options that pay only together: the neighbours (one flip each) find nothing, the
    # combinations of the best tiles' flags find runtime_magic + wrapper_sums
    both = lambda c: 1e-6 * (30.0 if c.runtime_magic and c.wrapper_sums else 40.0)  # noqa: E731
    t, best = T.descend([reg], both, 4096, 28672, time.perf_counter() + 60)
    assert best.runtime_magic and best.wrapper_sums and t == pytest.approx(30e-6)
    assert R(best, runtime_magic=False, wrapper_sums=False, raw_x=True) == reg   # same tiles
    combos = T.flag_combinations(reg)
    assert len(combos) == 36 == len(set(combos)) and reg in combos
    assert not any(c.half_pairs and c.raw_x or c.wrapper_sums and c.kernel_sums for c in combos)
    assert T.flag_combinations(tc) == [tc, R(tc, shift_patterns=True)]
    # a deadline already past: the best seed, no moves
    t, best = T.descend([reg], cost, 4096, 28672, time.perf_counter() - 1)
    assert best == reg and t == pytest.approx(40e-6)


def test_tune_quant_entries_above_64_rows_need_the_dequantize_route_beaten():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import tune_quant as T
    big = dataclasses.asdict(BIG)
    case = lambda M, best, dq: dict(M=M, K=4096, N=28672, format="w4g128", bf16_us=100.0,  # noqa: E731
                                    default=dict(us=300.0), best=dict(us=best, config=big),
                                    **({} if dq is None else dict(dequantize_us=dq)))
    res = dict(device=DEV, commit="abc1234", cases=[
        case(256, 150.0, 180.0),      # beats the route: tabled with its time
        case(512, 178.0, 180.0),      # within 2% of the route: not tabled
        case(2048, 150.0, None),      # the route not timed: not tabled
        case(64, 150.0, None)])       # 64 rows: the route does not matter
    entries = T.table_entries(res, "test")
    assert [e["key"]["M"] for e in entries] == [256, 64]
    assert entries[0]["dequantize_us"] == 180.0 and "dequantize_us" not in entries[1]


def test_table_variant_sets_options_on_chosen_entries(tmp_path, monkeypatch):
    """experiments/table_variant.py: the entries of one device and row bucket, options set and
    validated, written as a table that OPTGQA_TUNING puts before the packaged one."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import table_variant as V
    assert V.parse_settings(["raw_x=true", "wrapper_sums=False", "num_stages=2"]) == dict(
        raw_x=True, wrapper_sums=False, num_stages=2)
    for bad in ("raw_x", "=1", "raw_x=maybe"):
        with pytest.raises(ValueError, match="--set"):
            V.parse_settings([bad])
    key1, key16 = tuning_key(1, 4096, 28672, 4, 128), tuning_key(16, 4096, 28672, 4, 128)
    one = dataclasses.replace(TUNED, runtime_magic=True, wrapper_sums=True)
    table = tmp_path / "quant_matmul.json"
    table.write_text(json.dumps(dict(kernel="quant_matmul", entries=[
        dict(device=DEV, key=key1, config=dataclasses.asdict(one), us=34.4, source="s"),
        dict(device=DEV, key=key16, config=dataclasses.asdict(TUNED), us=50.0),
        dict(device="Other GPU", key=key1, config=dataclasses.asdict(one))])))
    out = tmp_path / "variant" / "quant_matmul.json"
    V.main(["--table", str(table), "--device", DEV, "--rows", "1", "--set", "raw_x=true",
            "kernel_sums=true", "wrapper_sums=false", "--out", str(out)])
    entries = json.loads(out.read_text())["entries"]
    assert len(entries) == 1 and entries[0]["key"] == key1 and "us" not in entries[0]
    want = dataclasses.replace(one, raw_x=True, kernel_sums=True, wrapper_sums=False)
    monkeypatch.setenv(tuning.ENV, str(out.parent))
    assert QuantMatmulConfig.for_shape("cuda", 1, 4096, 28672, 128, device=DEV) == want
    # an invalid combination, an unknown field, or no matching entry: an error, no file
    with pytest.raises(SystemExit):
        V.main(["--table", str(table), "--device", DEV, "--set", "kernel_sums=true",
                "--out", str(tmp_path / "bad.json")])          # with wrapper_sums still on
    with pytest.raises(SystemExit):
        V.main(["--table", str(table), "--device", DEV, "--set", "warp_size=64",
                "--out", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        V.main(["--table", str(table), "--device", "No GPU", "--set", "raw_x=true",
                "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    # --shapes: only the entries of those K x N
    with pytest.raises(SystemExit):
        V.main(["--table", str(table), "--device", DEV, "--shapes", "4096x4096",
                "--set", "raw_x=true", "--out", str(tmp_path / "bad.json")])
    V.main(["--table", str(table), "--device", DEV, "--rows", "1,16", "--shapes", "4096x28672",
            "--set", "num_stages=2", "--out", str(tmp_path / "s.json")])
    assert len(json.loads((tmp_path / "s.json").read_text())["entries"]) == 2
