"""Vision input through llama.cpp's mtmd: a projector (mmproj) owned by the engine, and images as prompt pieces.

`Projector` wraps one `mtmd_context`. `Projector.prompt` turns prompt text holding media markers plus the image
bytes into the token list the scheduler prefills, with every image already encoded (its embeddings copied out of
mtmd at once, so no mtmd object outlives the call). An image sits in the token list as `n_pos` copies of a
negative key derived from its bytes' hash: the list stays one entry per position (what the engine's sequences
and rollbacks count), and the slot prefix cache can never take one image for another.

Image bytes are checked in Python before mtmd sees them (`check_image`, which callers of `Projector.prompt` run
first, off the llama thread: size, format, dimensions, decodable by Pillow when it is installed): mtmd's buffer
loader falls back to launching ffprobe on bytes it cannot read as an image.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp.mtmd_cpp as M
import numpy as np

from ..core.errors import InvalidRequestError, ModelLoadError
from ..core.gguf_file import read_gguf
from .llamalog import LIVE, LLAMA_LOG

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one encoded image
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded size; a tiny PNG can claim gigapixels
# Formats llama.cpp's image loader (stb_image) decodes, by their magic bytes.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"))
_log_routed = False


@dataclass(frozen=True)
class Image:
    """One encoded image of a prompt: `n_tokens` embedding rows over `n_pos` positions starting at its first.

    `rel_pos` holds each row's 4 M-RoPE position sections relative to the image's first position (t, y, x, z, as
    llama.cpp's batch takes them); for a model without M-RoPE every section is the row's offset.
    """

    key: int  # the negative placeholder the prompt holds at this image's positions
    embd: np.ndarray  # [n_tokens, n_embd_inp] float32
    rel_pos: np.ndarray  # [n_tokens, 4] int32
    n_pos: int

    @property
    def n_tokens(self) -> int:
        return int(self.embd.shape[0])


def image_key(data: bytes) -> int:
    """A negative id from the image's bytes: equal images share it, different ones (practically) never."""
    return -1 - int.from_bytes(hashlib.sha256(data).digest()[:6], "little")


def check_image(data: bytes, what: str = "image", *, param: str | None = None) -> None:
    """Refuse bytes llama.cpp should not be handed: too large, not an image format it reads, too many pixels, or
    (with Pillow installed) not decodable. `param` names the request field the error blames."""
    if not data:
        raise InvalidRequestError(f"{what} is empty", param=param)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"{what} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES} bytes", param=param)
    if not any(data.startswith(magic) for magic, _ in _MAGIC):
        raise InvalidRequestError(f"{what} is not a PNG, JPEG, GIF or BMP image", param=param)
    try:
        from PIL import Image as PILImage
    except ImportError:  # mtmd's own decoder is the check then
        return
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(f"{what} is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels",
                                          param=param)
            img.load()
    except InvalidRequestError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, PILImage.DecompressionBombError) as exc:
        # What Pillow raises for truncated or corrupt data (fuzzed PNG/JPEG/GIF/BMP): OSError (truncation, and
        # UnidentifiedImageError), ValueError and SyntaxError (broken PNG chunks), EOFError, decompression bombs.
        # Anything else is a bug and propagates.
        raise InvalidRequestError(f"{what} cannot be decoded: {exc}", param=param) from None


def check_projector_file(path: Path) -> None:
    """The file must exist and be a GGUF vision projector (mtmd aborts on some malformed files)."""
    if not path.is_file():
        raise ModelLoadError(f"vision projector {path} does not exist")
    try:
        info = read_gguf(path)
    except (ModelLoadError, OSError) as exc:  # read_gguf's InvalidGGUFError/ModelNotFoundError, or the file's I/O
        raise ModelLoadError(f"vision projector {path} is not a GGUF file: {exc}") from None
    if info.architecture != "clip":
        raise ModelLoadError(f"{path} is not a vision projector (general.architecture is "
                             f"{info.architecture or 'missing'!r}, not 'clip')")
    if not info.metadata.get("clip.has_vision_encoder", False):
        raise ModelLoadError(f"{path} has no vision encoder (clip.has_vision_encoder is not true)")


class Projector:
    """An mtmd context for one text model; freed with `close` before the model (the engine does it)."""

    def __init__(self, path: str | Path, model: int, *, n_embd: int, n_threads: int, use_gpu: bool,
                 image_tokens: tuple[int, int] = (-1, -1)) -> None:
        """`image_tokens`: (fewest, most) tokens per image for dynamic-resolution projectors (-1: its own)."""
        global _log_routed
        self._ctx = None
        self.path = Path(path)
        self.n_embd = n_embd  # the text model's input width: one image embedding row
        check_projector_file(self.path)
        if not _log_routed:  # mtmd and its helpers log through their own callback: send it to ours
            M.mtmd_helper_log_set(LLAMA_LOG.callback, ctypes.c_void_p(0))
            _log_routed = True
        params = M.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        params.image_min_tokens, params.image_max_tokens = image_tokens
        with LLAMA_LOG.capture() as lines:
            ctx = M.mtmd_init_from_file(str(self.path).encode(), model, params)
        if not ctx:
            detail = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower()), "")
            raise ModelLoadError(f"llama.cpp could not load the vision projector {self.path}"
                                 + (f": {detail}" if detail else ""))
        self._ctx = ctx
        LIVE["mtmd"] += 1
        if not M.mtmd_support_vision(ctx):
            self.close()
            raise ModelLoadError(f"{self.path} is a projector without vision input (audio only?)")
        self.marker = M.mtmd_default_marker().decode()
        self.mrope = bool(M.mtmd_decode_use_mrope(ctx))
        self.size = self.path.stat().st_size

    def close(self) -> None:
        """Free the mtmd context (idempotent)."""
        if self._ctx:
            M.mtmd_free(self._ctx)
            self._ctx = None
            LIVE["mtmd"] -= 1

    def prompt(self, text: str, images: list[bytes], *, add_special: bool) -> tuple[list[int], tuple[Image, ...]]:
        """Tokenize `text` with one image per media marker and encode the images (on the llama thread).

        `images` must have passed `check_image` (the servicer checks them off this thread: a Pillow decode here
        would stall every slot's step). Returns the prompt (text tokens, and `n_pos` copies of each image's key at its positions) and the images.
        """
        n_markers = text.count(self.marker)
        if n_markers != len(images):
            raise InvalidRequestError(f"the prompt has {n_markers} image marker(s) ({self.marker}) for "
                                      f"{len(images)} image(s)", param="Images")
        bitmaps = []
        chunks = M.mtmd_input_chunks_init()
        try:
            for i, data in enumerate(images):
                buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bitmap = M.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(data), False)
                if not bitmap:
                    raise InvalidRequestError(f"image {i} cannot be decoded", param="Images")
                bitmaps.append(bitmap)
            raw = text.encode("utf-8")
            inp = M.mtmd_input_text(raw, len(raw), add_special, True)
            arr = (ctypes.c_void_p * max(1, len(bitmaps)))(*bitmaps)
            rc = M.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise InvalidRequestError(f"llama.cpp could not tokenize the images into the prompt ({rc})",
                                          param="Images")
            return self._flatten(chunks, images)
        finally:
            M.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                M.mtmd_bitmap_free(bitmap)

    def _flatten(self, chunks: int, images: list[bytes]) -> tuple[list[int], tuple[Image, ...]]:
        tokens: list[int] = []
        out: list[Image] = []
        n = ctypes.c_size_t()
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(chunk)
            if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ptr[:n.value])
                continue
            if kind != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise InvalidRequestError("only image input is supported", param="Images")
            image = self._encode(chunk, images[len(out)])
            out.append(image)
            tokens.extend([image.key] * image.n_pos)
        return tokens, tuple(out)

    def _encode(self, chunk: int, data: bytes) -> Image:
        if M.mtmd_decode_use_non_causal(self._ctx, chunk):  # gemma3-style: the engine decodes images causally
            raise InvalidRequestError(f"{self.path.name} needs non-causal attention over image rows, which this "
                                      "backend does not do", param="Images")
        n_tokens = int(M.mtmd_input_chunk_get_n_tokens(chunk))
        if M.mtmd_encode_chunk(self._ctx, chunk) != 0:
            raise InvalidRequestError("llama.cpp failed to encode an image", param="Images")
        ptr = M.mtmd_get_output_embd(self._ctx)
        n_embd = self.n_embd
        embd = np.ctypeslib.as_array(ptr, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        tokens_image = M.mtmd_input_chunk_get_tokens_image(chunk)
        rel = np.empty((n_tokens, 4), np.int32)
        for j in range(n_tokens):
            p = M.mtmd_image_tokens_get_decoder_pos(tokens_image, 0, j)
            rel[j] = (p.t, p.y, p.x, p.z)  # llama.cpp's section order (mtmd-helper's set_position_mrope_2d)
        return Image(key=image_key(data), embd=embd, rel_pos=rel, n_pos=int(M.mtmd_input_chunk_get_n_pos(chunk)))
