"""Prompt files and atomic writes."""

import os

import pytest

from g2rpo.data import read_prompt_file
from g2rpo.io import atomic_directory, atomic_write_bytes, load_state_dict_file, save_safetensors
from conftest import EXAMPLE_PROMPTS


def test_example_prompts_are_about_100_distinct(prompts):
    assert 90 <= len(prompts) <= 110
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and p for p in prompts)
    assert prompts == EXAMPLE_PROMPTS.read_text(encoding="utf-8").splitlines()


def test_prompt_file_errors_name_file_and_line(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("a cat\n\na dog\n")
    with pytest.raises(ValueError, match=r"blank.txt:2: blank line"):
        read_prompt_file(blank)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2: not valid UTF-8 \(byte 0xe9\)"):
        read_prompt_file(latin)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: the prompt file is empty"):
        read_prompt_file(empty)
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        read_prompt_file(tmp_path / "nothere.txt")


def test_prompt_file_tolerates_bom_crlf_and_padding(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff  a cat \r\nun café\r\n".encode("utf-8"))
    assert read_prompt_file(path) == ["a cat", "un café"]


def test_atomic_directory_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "temporary directory left behind"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("replacement")
    assert sorted(os.listdir(target)) == ["b.txt"]


def test_atomic_write_and_state_dict_files(tmp_path):
    import torch

    atomic_write_bytes(tmp_path / "x.bin", b"123")
    assert (tmp_path / "x.bin").read_bytes() == b"123"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    state = {"w": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_safetensors(state, tmp_path / "w.safetensors")
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "w.pt")["w"], state["w"])
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt does not hold a state dict"):
        load_state_dict_file(tmp_path / "junk.pt")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read .*cut.safetensors"):
        load_state_dict_file(tmp_path / "cut.safetensors", "transformer weights")
