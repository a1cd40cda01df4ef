"""CREMA-D: file-name labels, actor-disjoint and legacy splits, the OGM-GE spectrogram against a hand
computation, frame positions, the cached store (round trip, resumability, errors) and the model
(docs/datasets/cremad.md). Media are made here (tests/av_fixtures.py); no CREMA-D file is used."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from av_fixtures import grey, make_cremad_raw, tone, write_wav  # noqa: E402
from mmbalance.datasets import _avstore as S  # noqa: E402
from mmbalance.datasets import cremad as C  # noqa: E402

from mmbalance.errors import DatasetFormatError  # noqa: E402
from mmbalance.registry import create_dataset, create_model  # noqa: E402

LN_EPS = math.log(1e-7)
GOLDEN_TEST = [1003, 1008, 1009, 1014, 1017, 1025, 1027, 1031, 1034, 1042, 1044, 1046, 1054, 1060, 1069, 1080, 1087,
               1091]
GOLDEN_VAL = [1007, 1023, 1043, 1049, 1056, 1063, 1067, 1072, 1075]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_cremad_raw(tmp_path_factory.mktemp("cremad") / "raw", sentences=("DFA",), short="1004_DFA_SAD_XX")


@pytest.fixture(scope="module")
def store(raw) -> Path:
    out = raw.parent / "store"
    C.convert(raw, out, frame_size=32, log=lambda s: None)
    return out


# --------------------------------------------------------------------------- names and splits
def test_labels_from_file_names():
    assert C.parse_name("1001_DFA_ANG_XX") == {"actor": 1001, "sentence": "DFA", "emotion": "ANG", "level": "XX",
                                                "label": 5}
    assert C.parse_name("1001_IEO_HAP_HI")["label"] == 1
    assert [C.parse_name(f"1002_ITS_{e}_XX")["label"] for e in ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")] == \
        [0, 1, 2, 3, 4, 5]  # OGM-GE's order, not the sorted one
    with pytest.raises(DatasetFormatError, match="1001_XYZ_HAP.wav.*four fields"):
        C.parse_name("1001_XYZ_HAP", "AudioWAV/1001_XYZ_HAP.wav")
    with pytest.raises(DatasetFormatError, match="emotion code 'JOY'"):
        C.parse_name("1001_DFA_JOY_XX")
    with pytest.raises(DatasetFormatError, match="actor '1092'"):
        C.parse_name("1092_DFA_HAP_XX")


def test_actor_split_golden_disjoint_and_seeded():
    sp = C.actor_split(0)
    assert sp["test"] == GOLDEN_TEST and sp["val"] == GOLDEN_VAL
    assert [len(sp[s]) for s in ("train", "val", "test")] == [64, 9, 18]
    assert set(sp["train"]) | set(sp["val"]) | set(sp["test"]) == set(range(1001, 1092))
    assert not (set(sp["train"]) & set(sp["val"]) or set(sp["train"]) & set(sp["test"]) or set(sp["val"]) & set(sp["test"]))
    assert C.actor_split(1)["test"] != GOLDEN_TEST


def test_loader_splits_are_actor_disjoint_with_validation_from_training_actors(store):
    d = create_dataset("cremad", path=str(store))
    idx = json.loads((store / "index.json").read_text())
    actors = {s: {idx[int(p)]["actor"] for p in getattr(d, s).positions} for s in ("train", "val", "test")}
    # fixture actors 1001 1002 1003 1004 1007 1008: 1003, 1008 are golden test actors, 1007 validation
    assert actors == {"train": {1001, 1002, 1004}, "val": {1007}, "test": {1003, 1008}}
    for s in ("train", "val", "test"):  # every clip of an actor goes with it; labels follow the names
        split = getattr(d, s)
        assert len(split) == sum(e["actor"] in actors[s] for e in idx)
        for p, y in zip(split.positions, split.labels):
            assert C.EMOTIONS[y] == idx[int(p)]["key"].split("_")[2]
    # held-out carve for G-Blending/MSLR: whole training actors
    rest, held = d.train.carve_heldout(0.08, 0)
    a_rest = {idx[int(d.train.positions[i])]["actor"] for i in rest}
    a_held = {idx[int(d.train.positions[i])]["actor"] for i in held}
    assert len(a_held) == 1 and not a_rest & a_held and sorted(rest + held) == list(range(len(d.train)))


def _legacy_csvs(folder: Path, train: list[str], test: list[str], bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, clips in (("train", train), ("test", test)):
        text = "".join(f"{c},{c.split('_')[2]}\r\n" for c in clips)
        (folder / f"{name}.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return folder


def test_legacy_split_read_verified_and_carved(store, tmp_path):
    keys = [e["key"] for e in json.loads((store / "index.json").read_text())]
    train, test = keys[::2] + keys[1:8:2], keys[9::2]
    folder = _legacy_csvs(tmp_path / "ogm", train, test)
    with pytest.raises(DatasetFormatError) as exc:  # not OGM-GE's files: refused, naming both hashes
        C.read_legacy_split(folder)
    assert C.LEGACY_SHA256["train"] in str(exc.value) and "--legacy-split-unverified" in str(exc.value)
    rows_plain, h_plain = C.read_legacy_csv(folder / "train.csv")
    _legacy_csvs(tmp_path / "bom", train, test, bom=True)
    rows_bom, h_bom = C.read_legacy_csv(tmp_path / "bom" / "train.csv")
    assert rows_plain == rows_bom and h_plain == h_bom and rows_plain[0] == (train[0], train[0].split("_")[2])
    # the normalised hash: CR stripped, '\n'-joined, final '\n' (hand-built)
    import hashlib

    assert h_plain == hashlib.sha256("".join(f"{c},{c.split('_')[2]}\n" for c in train).encode()).hexdigest()
    with pytest.raises(DatasetFormatError, match="legacy_split.json"):
        create_dataset("cremad-legacy", path=str(store))
    C.convert(store.parent / "raw", store, legacy_split_dir=folder, legacy_split_unverified=True, frame_size=32,
              log=lambda s: None)  # writes only legacy_split.json (no re-decode: same fingerprint)
    d = create_dataset("cremad-legacy", path=str(store))
    pos = {k: i for i, k in enumerate(keys)}
    got_train = {keys[p] for p in d.train.positions} | {keys[p] for p in d.val.positions}
    assert got_train == set(train) and {keys[p] for p in d.test.positions} == set(test)
    assert d.info["legacy_split"] == "unverified" and d.info["known_bad_excluded"] == []
    labels = np.asarray([C.parse_name(c)["label"] for c in train])
    val_i, _ = __import__("mmbalance.data.splits", fromlist=["x"]).stratified_split(labels, [0.1, 0.9], 0)
    assert sorted(keys[p] for p in d.val.positions) == sorted(train[i] for i in val_i)
    assert sorted(pos[train[i]] for i in val_i) == sorted(d.val.positions.tolist())
    (store / "legacy_split.json").unlink()


# --------------------------------------------------------------------------- audio
def test_spectrogram_of_a_known_tone_against_hand_values(tmp_path):
    f = 32 * 22_050 / 512  # 1378.125 Hz: the centre of bin 32
    p = write_wav(tmp_path / "t.wav", tone(f, 3.0, 22_050, 0.5), 22_050, subtype="FLOAT")
    spec, seconds = C.clip_audio(p)
    assert spec.shape == (257, 188) and seconds == pytest.approx(3.0)
    inner = spec[:, 2:-2]
    np.testing.assert_allclose(inner[32], math.log(64), atol=0.01)  # A·Σw/2 = 0.5·256/2
    np.testing.assert_allclose(inner[31], math.log(32), atol=0.01)  # periodic Hann: neighbours ½ of the peak
    np.testing.assert_allclose(inner[33], math.log(32), atol=0.01)
    np.testing.assert_allclose(inner[34], LN_EPS, atol=0.01)
    silent = C.clip_audio(write_wav(tmp_path / "s.wav", np.zeros(22_050), 22_050))[0]
    np.testing.assert_allclose(silent, LN_EPS, atol=1e-6)
    # a 1.0-s clip is repeated (period 1 s = 22,050 samples) to 3 s: frames 1 s apart agree where the hop grid
    # realigns (62·353 vs 22,050·1 differ; use the raw signal check instead)
    x = tone(440, 1.0, 22_050, 0.4) * np.linspace(0.2, 1, 22_050).astype(np.float32)
    y = S.repeat_to(x, 66_150)
    np.testing.assert_array_equal(y[:22_050], y[22_050:44_100])
    assert C.clip_audio(write_wav(tmp_path / "one.wav", x, 22_050, subtype="FLOAT"))[0].shape == (257, 188)
    k = int(np.argmax(C.clip_audio(write_wav(tmp_path / "k.wav", tone(1000, 2.0, 16_000), 16_000))[0][:, 94]))
    assert k == round(1000 * 512 / 22_050)  # 16 kHz → 22,050 Hz resampled: 1 kHz in bin 23


def test_hann_and_centring_of_log_stft_match_a_direct_dft():
    rng = np.random.RandomState(0)
    x = rng.randn(2000).astype(np.float32)
    got = S.log_stft(x, 64, 20)
    xp = np.concatenate([np.zeros(32), x, np.zeros(32)])
    t = 7
    frame = xp[t * 20:t * 20 + 64] * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(64) / 64))
    dft = np.abs([np.sum(frame * np.exp(-2j * np.pi * k * np.arange(64) / 64)) for k in range(33)])
    np.testing.assert_allclose(got[:, t], np.log(dft + 1e-7), rtol=1e-5, atol=1e-5)
    assert got.shape == (33, 1 + 2000 // 20)


# --------------------------------------------------------------------------- frames
def test_frame_rule_and_store_positions(store):
    assert [n for n in range(61) if S.keep_frame(n, 30, 3)] == [0, 10, 20, 30, 40, 50, 60]
    assert [n for n in range(61) if S.keep_frame(n, 30, 1)] == [0, 30, 60]
    assert [n for n in range(30) if S.keep_frame(n, 25, 3)] == [0, 8, 16, 25]  # step 25 // 3 = 8
    st = S.AVStore(store, "cremad", C.CONVERT_CMD)
    idx = json.loads((store / "index.json").read_text())
    k = next(i for i, e in enumerate(idx) if e["key"] == "1001_DFA_NEU_XX")  # 1.27 s = 38 frames at 30 fps
    rows = np.arange(st.offsets[k], st.offsets[k + 1])
    assert st.src_index[rows].tolist() == [0, 10, 20, 30]
    np.testing.assert_allclose(st.times[rows], [0, 1 / 3, 2 / 3, 1.0], atol=0.02)
    levels = st.frames[rows].reshape(len(rows), -1).mean(1)
    np.testing.assert_allclose(levels, [grey(n) for n in (0, 10, 20, 30)], atol=3)
    assert st.src_index[st.clip_frames(k, 1)].tolist() == [0, 30]


def test_frame_picks():
    assert S.pick_frames(3, 1, "segment", False, None) == [1]
    assert S.pick_frames(8, 3, "segment", False, None) == [1, 4, 6]
    assert S.pick_frames(2, 3, "segment", False, None) == [0, 0, 1]
    assert S.pick_frames(2, 3, "segment", True, np.random.default_rng(0)) == [0, 0, 1]
    assert S.pick_frames(10, 3, "ogm_fixed", True, None) == [0, 3, 6]
    assert S.pick_frames(10, 3, "segment_int", False, None) == [1, 4, 7]
    seen = set()
    for s in range(200):
        picks = S.pick_frames(10, 3, "segment", True, np.random.default_rng([s, 0, 0]))
        assert all(math.floor(i * 10 / 3) <= p < (i + 1) * 10 / 3 for i, p in enumerate(picks))  # in its third
        seen.add(tuple(picks))
    assert len(seen) > 10


def test_training_picks_and_crops_follow_seed_epoch_item(store):
    d = create_dataset("cremad-3f", path=str(store))
    tr = d.train
    torch.manual_seed(5)
    tr.set_epoch(0)
    a, b = tr[3], tr[3]
    assert torch.equal(a["visual"], b["visual"])
    tr.set_epoch(1)
    assert not torch.equal(a["visual"], tr[3]["visual"])
    ev = d.val[0]["visual"]
    assert torch.equal(ev, d.val[0]["visual"])
    rng = np.random.default_rng(0)
    for _ in range(300):  # crops stay inside the frame, also with the native-aspect ratio correction
        top, left, h, w = S.random_resized_crop(32, 32, rng, ratio=(3 / 4 * 0.75, 4 / 3 * 0.75))
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32 and h > 0 and w > 0
    # evaluation frames are the stored frames, normalised
    st = tr.store
    row = d.val.frame_rows(0, None)
    raw = torch.from_numpy(np.asarray(st.frames[row], np.float32)).permute(3, 0, 1, 2)
    mean = torch.tensor(S.IMAGENET_MEAN).view(3, 1, 1, 1) * 255
    std = torch.tensor(S.IMAGENET_STD).view(3, 1, 1, 1) * 255
    torch.testing.assert_close(ev, (raw - mean) / std)


# --------------------------------------------------------------------------- the store
def test_cache_round_trip_equals_direct_decoding(store, raw):
    st = S.AVStore(store, "cremad", C.CONVERT_CMD)
    for k in (0, 7):
        key = st.index[k]["key"]
        spec, _ = C.clip_audio(raw / "AudioWAV" / f"{key}.wav")
        np.testing.assert_array_equal(np.asarray(st.audio[k]), spec.astype(np.float16))  # bitwise
        v = S.decode_video_frames(raw / "VideoFlash" / f"{key}.flv", 3, 32)
        np.testing.assert_array_equal(np.asarray(st.frames[st.offsets[k]:st.offsets[k + 1]]), v.frames)
        assert st.index[k]["native_w"] == 64 and st.index[k]["native_h"] == 48 and st.index[k]["native_fps"] == 30
    meta = json.loads((store / "meta.json").read_text())
    assert meta["n_clips"] == 42 and meta["bad"] == {} and meta["class_losses"] == {}


def test_store_pickles_as_a_reference_not_a_copy(store):
    import pickle

    st = S.AVStore(store, "cremad", C.CONVERT_CMD)
    blob = pickle.dumps(st)
    assert len(blob) < 100_000 < st.audio.nbytes  # spawned DataLoader workers get the path, not the arrays
    back = pickle.loads(blob)
    assert isinstance(back.frames, np.memmap) and np.array_equal(back.frames[5], st.frames[5])


def test_workers_resume_reuse_and_rebuild(raw, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counter = [0]
    C.convert(raw, a, frame_size=16, log=lambda s: None, decode_counter=counter)
    C.convert(raw, b, frame_size=16, workers=2, log=lambda s: None)
    for name in ("audio.npy", "frames.npy", "frame_offsets.npy", "frame_src_index.npy", "index.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    C.convert(raw, a, frame_size=16, log=lambda s: None, decode_counter=counter)
    assert counter[0] == 42  # the re-run decoded nothing
    fp = json.loads((a / "meta.json").read_text())["fingerprint"]
    assert S.fingerprint({"cache_fps": 1}, [], raw) != S.fingerprint({"cache_fps": 3}, [], raw)
    # an interrupted conversion resumes: pretend 40 clips were decoded by a killed run
    jobs = C.index_raw(raw)
    parts = tmp_path / f".c.parts-{fp[:16]}"
    (a / "_COMPLETE").unlink()  # no _COMPLETE: the store is rebuilt, the loader refuses it meanwhile
    with pytest.raises(Exception, match="_COMPLETE"):
        create_dataset("cremad", path=str(a))
    out = tmp_path / "c"
    import functools

    dec = functools.partial(C.decode_clip, cache_fps=3, frame_size=16, max_video_seconds=10.0, resampler="soxr_hq",
                            stft_pad="constant")
    parts.mkdir()
    for k, j in enumerate(jobs[:40]):
        S._decode_one((dec, j, parts / f"{k:07d}.npz"))
    counter = [0]
    C.convert(raw, out, frame_size=16, log=lambda s: None, decode_counter=counter)
    assert counter[0] == 2 and (out / "frames.npy").read_bytes() == (b / "frames.npy").read_bytes()
    assert not parts.exists()


def _cli(argv):
    return C.main([str(a) for a in argv])


def test_corrupt_missing_and_pointer_files_exit_2_and_leave_nothing(raw, tmp_path, capsys):
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    (bad / "VideoFlash" / "1002_DFA_FEA_XX.flv").write_bytes(b"\x00garbage" * 100)
    (bad / "AudioWAV" / "1001_DFA_DIS_XX.wav").write_bytes(b"")
    out = tmp_path / "out"
    assert _cli(["--raw", bad, "--out", out, "--frame-size", 16]) == 2
    err = capsys.readouterr().err
    assert "VideoFlash/1002_DFA_FEA_XX.flv" in err and "AudioWAV/1001_DFA_DIS_XX.wav" in err and "--skip-bad" in err
    assert not out.exists() or not any(out.iterdir())
    assert _cli(["--raw", bad, "--out", out, "--frame-size", 16, "--skip-bad"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["bad"]) == ["1001_DFA_DIS_XX", "1002_DFA_FEA_XX"]
    assert meta["class_losses"] == {"fear": {"expected": 6, "lost": 1}, "disgust": {"expected": 6, "lost": 1}}
    assert (out / "bad.txt").read_text().count("\n") == 2 and meta["n_clips"] == 40
    text = capsys.readouterr().out
    assert "class 'fear' lost 1 of 6" in text and "excluded 1002_DFA_FEA_XX" in text
    # a WAV without video, and an LFS pointer stub
    lone = tmp_path / "lone"
    shutil.copytree(raw, lone)
    (lone / "VideoFlash" / "1003_DFA_ANG_XX.flv").unlink()
    (lone / "AudioWAV" / "1004_DFA_ANG_XX.wav").write_bytes(S.LFS_MAGIC + b"\noid sha256:abc\nsize 12\n")
    assert _cli(["--raw", lone, "--out", tmp_path / "o2", "--frame-size", 16]) == 2
    err = capsys.readouterr().err
    assert "1003_DFA_ANG_XX.wav has no video" in err
    (lone / "AudioWAV" / "1003_DFA_ANG_XX.wav").unlink()
    assert _cli(["--raw", lone, "--out", tmp_path / "o2", "--frame-size", 16]) == 2
    assert "git-lfs pointer" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_missing_or_malformed_store_exits_2_naming_file_and_converter(store, tmp_path, capsys):
    from mmbalance.run import main

    assert main(["--method", "baseline", "--dataset", "cremad", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope does not exist" in err and "python -m mmbalance.datasets.cremad" in err
    (tmp_path / "empty" / "cremad").mkdir(parents=True)  # <data-dir>/cremad is used when present
    assert main(["--method", "baseline", "--dataset", "cremad", "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "empty/cremad/_COMPLETE is missing" in err and "python -m mmbalance.datasets.cremad" in err
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    np.save(broken / "frame_offsets.npy", np.zeros(3, np.int64))
    assert main(["--method", "baseline", "--dataset", "cremad", "--set", f"dataset.path={broken}"]) == 2
    err = capsys.readouterr().err
    assert "frame_offsets.npy" in err and "python -m mmbalance.datasets.cremad" in err and "Traceback" not in err


# --------------------------------------------------------------------------- model
def test_model_shapes_parameters_and_split_head():
    shapes = {"audio": (1, 257, 188), "visual": (3, 1, 224, 224)}
    m = create_model("av_resnet18", modalities=["audio", "visual"], input_shapes=shapes, out_dim=6)
    counts = {k: sum(p.numel() for p in e.parameters()) for k, e in m.encoders.items()}
    assert counts == {"audio": 11_170_240, "visual": 11_176_512}
    assert sum(p.numel() for p in m.parameters()) == 22_352_902
    assert m.split_head() == {"audio": slice(0, 512), "visual": slice(512, 1024)}
    small = create_model("av_resnet18", modalities=["audio", "visual"], out_dim=6, width=8,
                         input_shapes={"audio": (1, 257, 188), "visual": (3, 3, 32, 32)})
    a, v = torch.randn(2, 1, 257, 188), torch.randn(2, 3, 3, 32, 32)
    out = small({"audio": a, "visual": v})
    assert out.features["audio"].shape == (2, 64, 9, 6) and out.features["visual"].shape == (2, 64, 3, 1, 1)
    torch.testing.assert_close(out.pooled["visual"], out.features["visual"].mean(dim=(2, 3, 4)))
    # temporal pooling: each frame goes through the 2-D trunk on its own (frame order does not matter)
    small.eval()
    z1 = small.encoders["visual"](v)
    z2 = small.encoders["visual"](v[:, :, [2, 0, 1]])
    torch.testing.assert_close(z1[:, :, [2, 0, 1]], z2)
    torch.testing.assert_close(out.logits, out.fused @ small.head.weight.t() + small.head.bias)
    mm = create_model("av_resnet18_mmtm", modalities=["audio", "visual"], out_dim=6, width=8,
                      input_shapes={"audio": (1, 257, 188), "visual": (3, 3, 32, 32)})
    assert len(mm.mmtm_blocks) == 3 and [b.dims for b in mm.mmtm_blocks] == [[16, 16], [32, 32], [64, 64]]
    o = mm({"audio": a, "visual": v})
    torch.testing.assert_close(o.logits, o.fused.mean(1))


def test_not_enough_disk_space_stops_before_writing_and_keeps_the_decoded_parts(raw, tmp_path, monkeypatch, capsys):
    import collections

    real = shutil.disk_usage
    monkeypatch.setattr(S.shutil, "disk_usage",
                        lambda p: collections.namedtuple("U", "total used free")(real(p).total, real(p).used, 1000))
    out = tmp_path / "store"
    assert C.main(["--raw", str(raw), "--out", str(out), "--frame-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "GB are free" in err and not out.exists()
    assert len(list(next(tmp_path.glob(".store.parts-*")).glob("*.npz"))) == 42  # a re-run resumes from these
    monkeypatch.setattr(S.shutil, "disk_usage", real)
    counter = [0]
    C.convert(raw, out, frame_size=16, log=lambda s: None, decode_counter=counter)
    assert counter[0] == 0 and (out / "_COMPLETE").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["suspicious"] == []  # fixture audio and video have the same duration


def test_training_items_do_not_depend_on_worker_count_and_follow_set_epoch_in_persistent_workers(store):
    """Per-item randomness comes from (run seed, epoch, item): 0 and 2 DataLoader workers give the same
    batches, and set_epoch reaches persistent workers (shared state), so epoch 1 differs from epoch 0."""
    from mmbalance.data import make_loader

    d = create_dataset("cremad-3f", path=str(store))

    def batches(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(3)
        loader = make_loader(d.train, 8, shuffle=False, seed=0, num_workers=workers)
        out = []
        for epoch in (0, 1):
            d.train.set_epoch(epoch)
            out.append(torch.cat([b["visual"] for b in loader]))
        return out

    (a0, a1), (b0, b1) = batches(0), batches(2)
    assert torch.equal(a0, b0) and torch.equal(a1, b1) and not torch.equal(a0, a1)


def test_jpeg_frame_store_is_close_to_the_raw_store(store, raw, tmp_path):
    """--frame-codec jpeg (quality 95, 4:4:4): same clips, audio bitwise, frames within PSNR > 35 dB."""
    out = tmp_path / "jpeg"
    C.convert(raw, out, frame_size=32, frame_codec="jpeg", log=lambda s: None)
    a, j = S.AVStore(store, "cremad", C.CONVERT_CMD), S.AVStore(out, "cremad", C.CONVERT_CMD)
    assert j.codec == "jpeg" and not (out / "frames.npy").exists()
    assert (out / "audio.npy").read_bytes() == (store / "audio.npy").read_bytes()
    assert np.array_equal(a.offsets, j.offsets) and np.array_equal(a.src_index, j.src_index)
    x, y = a.get_frames(slice(0, len(a.src_index))).astype(float), j.get_frames(slice(0, len(j.src_index))).astype(float)
    psnr = 10 * np.log10(255 ** 2 / np.mean((x - y) ** 2))
    assert psnr > 35, psnr
    rows = [3, 0, 7]
    np.testing.assert_array_equal(j.get_frames(rows), np.stack([j.get_frames([r])[0] for r in rows]))
    d = create_dataset("cremad", path=str(out))
    assert d.train[0]["visual"].shape == (3, 1, 32, 32)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["frame_codec"] == "jpeg" and meta["fingerprint"] != json.loads(
        (store / "meta.json").read_text())["fingerprint"]
