"""What a data stream depends on (jalign.data.fingerprint): what changes it and what not."""

import os
import types

from jalign.data.fingerprint import differences, source_fingerprint


def _config(path, split="train"):
    return types.SimpleNamespace(path=str(path), split=split)


def test_a_file_changes_with_its_content_not_its_time(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n')
    before = {"source": source_fingerprint(_config(f)), "tokenizer": "t"}
    os.utime(f, (1, 1))  # touched: the same records
    assert differences(before, {"source": source_fingerprint(_config(f)), "tokenizer": "t"}) == []
    f.write_text('{"a": 2}\n')
    (line,) = differences(before, {"source": source_fingerprint(_config(f)), "tokenizer": "t"})
    assert line.startswith(f"{f} changed (content hash ") and "same size" in line


def test_a_saved_dataset_directory_names_the_file_that_changed_or_appeared(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data-0.arrow").write_bytes(b"x" * 10)
    before = {"source": source_fingerprint(_config(tmp_path / "ds"))}
    (tmp_path / "ds" / "data-1.arrow").write_bytes(b"y")
    (tmp_path / "ds" / "data-0.arrow").write_bytes(b"x" * 11)
    after = {"source": source_fingerprint(_config(tmp_path / "ds"))}
    changed, added = differences(before, after)
    assert changed.startswith(f"{tmp_path / 'ds' / 'data-0.arrow'} changed (content hash ")
    assert changed.endswith(", 10 -> 11 bytes)")
    assert added == f"{tmp_path / 'ds' / 'data-1.arrow'} was not read before (a new file)"


def test_hub_data_bundled_data_and_the_tokenizer():
    hub = {"source": source_fingerprint(_config("org/set"), "abc"), "tokenizer": "t"}
    assert list(hub["source"]) == ["hub:org/set[train]"]
    assert differences(hub, {"source": source_fingerprint(_config("org/set"), "abd"),
                             "tokenizer": "t"}) == [
        "hub:org/set[train] changed (datasets fingerprint abc -> abd)"]
    bundled = {"source": source_fingerprint(_config("bundled:add")), "tokenizer": "t"}
    assert differences(bundled, dict(bundled, tokenizer="u")) == [
        "the tokenizer or its chat template changed"]
