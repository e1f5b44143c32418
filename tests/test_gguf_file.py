"""quantkit.toolchain.gguf_file: one parse per GGUF file (by identity), re-parsed when the file changes."""
import os

import numpy as np


def _write(path, n_tensors: int, file_type: int):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.full((4, 32), i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_one_parse_per_file_and_a_new_one_after_a_rewrite(tmp_path):
    import gguf

    from quantkit.toolchain.gguf_file import gguf_summary

    f = tmp_path / "m.gguf"
    _write(f, 2, int(gguf.LlamaFileType.MOSTLY_Q8_0))
    first = gguf_summary(f)
    assert [t.name for t in first.tensors] == ["blk.0.ffn_up.weight", "blk.1.ffn_up.weight"]
    assert first.tensors[0].type == "F32" and first.tensors[0].n_elements == 128 and first.tensors[0].n_bytes == 512
    assert first.file_type() == "Q8_0" and first.metadata["tokenizer.ggml.model"] == "gpt2"
    assert gguf_summary(f) is first  # cached: not parsed again
    os.link(f, tmp_path / "published.gguf")  # the store's publish on one filesystem
    assert gguf_summary(tmp_path / "published.gguf") is first
    (tmp_path / "published.gguf").unlink()
    f.unlink()
    _write(f, 3, int(gguf.LlamaFileType.MOSTLY_F16))
    again = gguf_summary(f)
    assert again is not first and len(again.tensors) == 3 and again.file_type() == "F16"
