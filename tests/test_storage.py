import pytest

from medvl import storage


@pytest.mark.parametrize("scheme", ["plain", "file", "s3"])
def test_roundtrip_list_exists(scheme, tmp_path, s3_endpoint):
    root = {"plain": str(tmp_path), "file": f"file://{tmp_path}", "s3": f"{s3_endpoint}/st"}[scheme]
    a, b = storage.join(root, "x", "a.txt"), storage.join(root, "x", "y", "b.bin")
    storage.write_text(a, "你好")
    storage.write_bytes(b, b"\x00\x01")
    assert storage.read_text(a) == "你好"
    assert storage.read_bytes(b) == b"\x00\x01"
    assert storage.exists(a) and not storage.exists(storage.join(root, "nope"))
    assert storage.list_files(storage.join(root, "x")) == [storage.join(root, "x", "a.txt"), b]
    assert storage.list_files(root, suffix=".bin") == [b]
    storage.delete_dir(storage.join(root, "x"))
    assert not storage.exists(a)


def test_s3_dir_copies_to_local(tmp_path, s3_endpoint):
    storage.write_text(f"{s3_endpoint}/tokdir/sub/f.json", "{}")
    local = storage.copy_dir_to_local(f"{s3_endpoint}/tokdir", str(tmp_path / "t"))
    assert (tmp_path / "t" / "sub" / "f.json").read_text() == "{}"
    assert local == str(tmp_path / "t")
