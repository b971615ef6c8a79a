"""Spoken digits for the audio quickstart, synthesized offline with espeak-ng (Debian's package,
`launch/ensure_espeak.sh`): no speech corpus installs offline, so this one is generated.

The words "zero" … "nine", each spoken by many synthetic speakers: a speaker is one of espeak-ng's
English voices (accents) with one of its voice variants (male/female timbres), and every clip
draws its own speed and pitch. Clips are resampled to 16 kHz and written as 16-bit WAV files
(pretraining input for `darkmatter prepare --modality audio`); the labeled Parquet file (columns
`audio` = WAV bytes, `label` = the digit, `speaker`, `split`) holds the same clips, with the
speakers of `split == "test"` never in the training rows: the probe is scored on unheard voices.

    python -m darkmatter.quickstart.speech OUT_DIR TASK.parquet      (cached: a second run is a no-op)
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's English voices without MBROLA (`espeak-ng --voices=en`, Debian's espeak-ng 1.51).
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-029", "en-us-nyc")  # fmt: skip
# Its voice variants (espeak-ng-data/voices/!v): timbres, male and female; "" is the voice's own.
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SPEED = (120, 220)  # words per minute (espeak-ng's default: 175)
PITCH = (20, 80)  # 0-99 (default 50)
TEST_SPEAKERS = 0.3  # share of the speakers held out for the probe's test rows
RATE = 16_000
_FORMAT = 1  # bump when the same arguments would give other clips


def speakers() -> list[str]:
    return [v + (f"+{x}" if x else "") for v in VOICES for x in VARIANTS]


def espeak_binary() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise SystemExit("espeak-ng is missing: run launch/ensure_espeak.sh "
                         "(or apt-get install espeak-ng)")  # fmt: skip
    return found


def speak(binary: str, word: str, speaker: str, speed: int, pitch: int) -> np.ndarray:
    """One word as float32 samples at 16 kHz (espeak-ng speaks at 22,050 Hz)."""
    import soundfile

    from darkmatter.trainer.objectives.wav2vec2 import to_16k

    cmd = [binary, "-v", speaker, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    out = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    if out.returncode or not out.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace')[:200]}")
    wave, rate = soundfile.read(io.BytesIO(out.stdout), dtype="float32", always_2d=True)
    return to_16k(wave.mean(axis=1), int(rate), f"espeak-ng {speaker} {word!r}")


def spoken_digits(out_dir: Path, task_url: str, per_digit: int = 150, seed: int = 0,
                  workers: int = 4) -> dict[str, int]:  # fmt: skip
    """WAV files in `out_dir` for pretraining (no labels) and the labeled Parquet `task_url`.
    Cached: `out_dir/spoken_digits.json` records what was made, and the same call again
    returns at once while the Parquet file is there. Returns the counts (clips, speakers, test clips)."""
    import soundfile

    from darkmatter import storage
    from darkmatter.quickstart.run import write_parquet

    out_dir = Path(out_dir)
    binary = espeak_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    want = {"format": _FORMAT, "per_digit": per_digit, "seed": seed, "espeak": version,
            "task": task_url}  # fmt: skip
    stamp = out_dir / "spoken_digits.json"
    if stamp.is_file():
        made = json.loads(stamp.read_text())
        if made.get("made") == want and storage.exists(task_url):
            return dict(made["counts"])
    rng = np.random.default_rng(seed)
    names = speakers()
    test = set(rng.permutation(names)[: round(TEST_SPEAKERS * len(names))].tolist())
    plan = []
    for digit in range(len(WORDS)):
        for _ in range(per_digit):
            who = names[int(rng.integers(len(names)))]
            plan.append((digit, who, int(rng.integers(SPEED[0], SPEED[1] + 1)),
                         int(rng.integers(PITCH[0], PITCH[1] + 1))))  # fmt: skip
    order = rng.permutation(len(plan))  # files in no label order
    plan = [plan[i] for i in order]
    with ThreadPoolExecutor(workers) as pool:  # each call is its own espeak-ng process
        waves = list(pool.map(lambda p: speak(binary, WORDS[p[0]], p[1], p[2], p[3]), plan))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    blobs = []
    for i, wave in enumerate(waves):
        buf = io.BytesIO()
        soundfile.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
        (out_dir / f"{i:05d}.wav").write_bytes(buf.getvalue())
        blobs.append(buf.getvalue())
    write_parquet({
        "audio": blobs, "label": [p[0] for p in plan], "speaker": [p[1] for p in plan],
        "split": ["test" if p[1] in test else "train" for p in plan],
    }, task_url)  # fmt: skip
    counts = {"clips": len(plan), "speakers": len(names),
              "test_clips": sum(p[1] in test for p in plan)}  # fmt: skip
    stamp.write_text(json.dumps({"made": want, "counts": counts}))
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m darkmatter.quickstart.speech", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out_dir", type=Path, help="folder for the WAV files")
    p.add_argument("task", help="labeled Parquet file to write (path or URL)")
    p.add_argument("--per-digit", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(spoken_digits(args.out_dir, args.task, args.per_digit, args.seed)))


if __name__ == "__main__":
    main()
