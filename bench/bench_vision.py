"""What an image costs to prefill on the synthetic VLM (a synthetic qwen35moe + its tiny qwen3vl_merger projector).

Per image: the projector's share (mtmd tokenize + ViT encode: `Projector.prompt`), then the trunk's (the image
rows decoded as embeddings at their M-RoPE positions, mirrored into the MTP context: `Engine.decode_image` and
the mirror flush), against a text baseline of the same number of prompt tokens decoded into the same engine.
Rounds are interleaved and the median is printed; the sequence is reset between rounds.

    python bench/bench_vision.py [--preset tiny] [--size 256] [--rounds 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median

from backend.engine.llama import Engine, EngineConfig
from backend.synth.mmproj import write_projector
from backend.synth.qwen35moe import PRESETS, write_model


def _image(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((size, size), 50).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (the projector caps it)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "vlm.gguf", config, dtype="f16")
        proj = write_projector(Path(tmp) / "mmproj.gguf", config.n_embd)
        engine = Engine(model, EngineConfig(n_ctx=2048, n_seq=1, mtp=True, n_draft_max=3, n_threads=args.threads,
                                            mmproj=str(proj)))
        try:
            data = _image(args.size)
            marker = engine.projector.marker
            encode, decode, text = [], [], []
            n_tokens = n_pos = 0
            for _ in range(args.rounds):
                engine.reset()
                t0 = time.perf_counter()
                prompt, images = engine.projector.prompt(f"look {marker} here", [data], add_special=False)
                t1 = time.perf_counter()
                engine.decode_tokens([t for t in prompt[:prompt.index(images[0].key)]], logits="none")
                t2 = time.perf_counter()
                engine.decode_image(0, images[0])
                engine.flush_mirror([0])
                t3 = time.perf_counter()
                n_tokens, n_pos = images[0].n_tokens, images[0].n_pos
                engine.reset()
                filler = engine.tokenize("the quick brown fox " * n_tokens, add_special=False)[:n_tokens]
                t4 = time.perf_counter()
                engine.decode_tokens(filler, logits="none")
                engine.flush_mirror([0])
                t5 = time.perf_counter()
                encode.append(t1 - t0)
                decode.append(t3 - t2)
                text.append(t5 - t4)
        finally:
            engine.close()
    enc, dec, txt = (1000 * median(v) for v in (encode, decode, text))
    print(f"# {machine()}")
    print(f"# synthetic VLM: qwen35moe {args.preset} (n_embd {config.n_embd}) + qwen3vl_merger projector, "
          f"MTP on, {args.size}x{args.size} px image, median of {args.rounds}")
    print(f"image prefill: {enc + dec:.1f} ms/image ({enc:.1f} ms encode + {dec:.1f} ms decode), "
          f"{n_tokens} tokens/image over {n_pos} positions; text prefill of {n_tokens} tokens: {txt:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
