"""AVE: annotation parsing, duplicate and cross-split videos, PMR's event-segment audio and frames, the store
and its errors (docs/datasets/ave.md). Media are made in the tests (tests/av_fixtures.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("soxr")

from av_fixtures import grey, make_ave_raw  # noqa: E402
from mmbalance.datasets import _avstore as S  # noqa: E402
from mmbalance.datasets import ave as A  # noqa: E402

from mmbalance.errors import DatasetFormatError  # noqa: E402
from mmbalance.registry import create_dataset  # noqa: E402


@pytest.fixture(scope="module")
def ave(tmp_path_factory) -> tuple[Path, Path]:
    raw, _ = make_ave_raw(tmp_path_factory.mktemp("ave") / "raw")
    out = raw.parent / "store"
    A.convert(raw, out, split_unverified=True, frame_size=16, skip_bad=True, log=lambda s: None)
    return raw, out


def test_parsing_header_categories_and_hashes(tmp_path):
    p = tmp_path / "Annotations.txt"
    p.write_bytes(b"Category&VideoID&Quality&StartTime&EndTime\r\nBanjo&abcdefghijk&good&2&5\r\n")
    rows, digest = A.read_rows(p)
    assert rows == [{"video": "abcdefghijk", "label": 17, "start": 2, "end": 5}]
    assert digest == hashlib.sha256(b"Banjo&abcdefghijk&good&2&5\n").hexdigest()  # header and CR ignored
    assert [A.CLASS_NAMES.index(c) for c in ("Church bell", "Banjo", "Mandolin")] == [0, 17, 27]
    p.write_text("Banjo&abcdefghijk&good&2&5\nKazoo&abcdefghijk&good&0&10\n")
    with pytest.raises(DatasetFormatError, match=r"Annotations.txt:2: unknown category 'Kazoo'"):
        A.read_rows(p)


def test_duplicates_and_clean_preset(ave):
    raw, out = ave
    rows = A.read_rows(raw / "trainSet.txt")[0]
    first = dict(A.split_ids(rows, "first"))
    assert first["dupDUPdup01"] == 17 and dict(A.split_ids(rows, "last"))["dupDUPdup01"] == 27
    assert "dupDUPdup01" not in dict(A.split_ids(rows, "drop")) and len(A.split_ids(rows, "drop")) == len(first) - 1
    plain, clean = create_dataset("ave", path=str(out)), create_dataset("ave_clean", path=str(out))
    idx = json.loads((out / "index.json").read_text())
    keys = {s: [idx[int(p)]["key"] for p in getattr(plain, s).positions] for s in ("train", "val", "test")}
    assert "crossXtest1" in keys["train"] and "crossXtest1" in keys["test"]
    assert clean.info["removed_cross_split"] == ["crossXtest1"]
    assert "crossXtest1" not in [idx[int(p)]["key"] for p in clean.train.positions]
    assert "crossXtest1" in [idx[int(p)]["key"] for p in clean.test.positions]  # only removed from train
    assert len(clean.train) == len(plain.train) - 1 and len(clean.test) == len(plain.test)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["missing_videos"] == ["missingVID0"] and meta["missing_per_class"] == {"Banjo": 1}
    assert meta["cross_split_videos"] == ["crossXtest1"] and meta["duplicate_videos"]["train"] == ["dupDUPdup01"]
    assert meta["n_clips"] == len({r["key"] for r in idx}) == 27  # one entry per distinct video


def test_event_audio_is_the_repeated_event_standardised():
    rate = 16_000
    t = np.arange(10 * rate) / rate
    x = np.where((t >= 2) & (t < 5), 0.3 * np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
    s = A.event_audio(x, rate, 2, 5)
    assert s.shape == (257, 1004) and abs(s.mean()) < 1e-3 and abs(s.std() - 1) < 1e-3
    peak = s.argmax(axis=0)
    assert (peak == 32).all()  # 1000·512/16000: every frame holds the tone (the event is repeated, no silence)
    assert not np.allclose(A.event_audio(x, rate, 2, 5, "full"), s)
    # a 0-length event uses [start, start + 1)
    np.testing.assert_allclose(A.event_audio(x, rate, 3, 3), A.event_audio(x, rate, 3, 4))
    # by hand: scipy's spectrogram of the 10-s repetition, log, standardised
    from scipy.signal import spectrogram

    y = np.tile(x[2 * rate:5 * rate], 4)[:160_000]
    ref = np.log(spectrogram(y, fs=rate, nperseg=512, noverlap=353)[2] + 1e-7)
    np.testing.assert_allclose(s, (ref - ref.mean()) / (ref.std() + 1e-9), atol=1e-4)


def test_event_frames_and_picks(ave):
    _, out = ave
    st = S.AVStore(out, "ave", A.CONVERT_CMD)
    by_key = {e["key"]: k for k, e in enumerate(st.index)}

    def src(key):
        k = by_key[key]
        return st.src_index[st.offsets[k]:st.offsets[k + 1]].tolist()

    e = {e["key"]: e for e in st.index}
    full = next(k for k, v in e.items() if (v["start"], v["end"]) == (0, 10) and "dup" not in k)
    assert src(full) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]  # 1-fps frames of the event, r = 10
    short = next(k for k, v in e.items() if (v["start"], v["end"]) == (2, 5))
    assert src(short) == [int(np.floor(10 * (2 + (j + 0.5) * 0.3))) for j in range(10)]  # fewer than 10: fill rule
    assert src("zeroLENgth0") == [int(np.floor(10 * (0 + (j + 0.5) * 0.1))) for j in range(10)]
    k = by_key[short]
    np.testing.assert_allclose(st.frames[st.offsets[k]:st.offsets[k + 1]].reshape(10, -1).mean(1),
                               [grey(n) for n in src(short)], atol=3)
    assert S.pick_frames(10, 4, "segment", False, None) == [1, 3, 6, 8]


def test_store_round_trip_and_errors(ave, tmp_path, capsys):
    raw, out = ave
    st = S.AVStore(out, "ave", A.CONVERT_CMD)
    k = 3
    e = st.index[k]
    x, sr = S.decode_audio_native(raw / "AVE" / f"{e['key']}.mp4")
    np.testing.assert_array_equal(np.asarray(st.audio[k]), A.event_audio(x, sr, e["start"], e["end"]).astype(np.float16))
    # the missing video: exit 2 listing it; a corrupt MP4: exit 2 naming it; nothing left under --out
    assert A.main(["--raw", str(raw), "--out", str(tmp_path / "o"), "--split-unverified", "--frame-size", "16"]) == 2
    assert "missingVID0" in capsys.readouterr().err
    r2 = tmp_path / "raw"
    shutil.copytree(raw, r2)
    (r2 / "AVE" / "crossXtest1.mp4").write_bytes(b"\x00" * 300)
    train = (r2 / "trainSet.txt").read_text().splitlines()
    (r2 / "trainSet.txt").write_text("".join(f"{x}\n" for x in train if "missingVID0" not in x))
    assert A.main(["--raw", str(r2), "--out", str(tmp_path / "o"), "--split-unverified", "--frame-size", "16"]) == 2
    assert "AVE/crossXtest1.mp4" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert A.main(["--raw", str(r2), "--out", str(tmp_path / "o"), "--split-unverified", "--frame-size", "16",
                   "--skip-bad"]) == 0  # listed and counted instead
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert list(meta["bad"]) == ["crossXtest1"] and meta["class_losses"] == {"Church bell": {"expected": 9, "lost": 1}}
    assert "class 'Church bell' lost 1 of 9" in capsys.readouterr().out
    # a validation class emptied by missing videos is an error even with --skip-bad
    for line in (r2 / "valSet.txt").read_text().splitlines():
        if line.startswith("Mandolin"):
            (r2 / "AVE" / f"{line.split('&')[1]}.mp4").unlink()
    assert A.main(["--raw", str(r2), "--out", str(tmp_path / "o"), "--split-unverified", "--skip-bad"]) == 2
    assert "no val video left for class(es) Mandolin" in capsys.readouterr().err
