"""Run llama.cpp's convert_hf_to_gguf.py with the tokenizer taken from another GGUF file.

    python quantkit/formats/_gguf_vocab.py SOURCE.gguf CONVERTER.py [converter arguments...]

For a checkpoint imported from a GGUF (quantkit model import-gguf), the tokenizer files transformers wrote are
a re-derivation that the converter often cannot classify ("BPE pre-tokenizer was not recognized"), while the
source GGUF carries llama.cpp's own, complete tokenizer. The model class the converter picks gets its
`set_vocab` replaced by a copy of every `tokenizer.*` key of the source, so the round trip GGUF -> HF -> GGUF
keeps exactly the tokenizer llama.cpp had. Everything else is the unmodified converter.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def _copy_tokenizer(source: Path):
    def set_vocab(self) -> None:
        import gguf

        reader = gguf.GGUFReader(str(source))
        for name, field in reader.fields.items():
            if not name.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            self.gguf_writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    return set_vocab


def main() -> None:
    source, script, *args = sys.argv[1:]
    here = Path(__file__).resolve().parent  # a runner may have put this directory first: its gguf.py is not gguf
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(Path(script).parent))
    sys.path.insert(1, str(Path(script).parent / "gguf-py"))
    import conversion

    original = conversion.get_model_class

    def get_model_class(name: str, mmproj: bool = False):
        cls = original(name, mmproj=mmproj)
        if not mmproj:
            cls.set_vocab = _copy_tokenizer(Path(source))
        return cls

    conversion.get_model_class = get_model_class
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
