import os

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
    storage.copy_dir(f"{s3_endpoint}/tokdir", str(tmp_path / "t"))
    assert (tmp_path / "t" / "sub" / "f.json").read_text() == "{}"


def test_a_model_dir_without_its_weights_for_tokenizer_and_config(s3_endpoint):
    """The Serve ingress needs tokenizer + config of a 26 GB model directory, not its shards."""
    uri = f"{s3_endpoint}/model-light"
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "sub/x.bin"):
        storage.write_text(f"{uri}/{name}", "{}")
    with storage.local_dir(uri, weights=False) as light, storage.local_dir(uri) as full:
        assert sorted(os.listdir(light)) == ["config.json", "tokenizer.json"]
        assert "model-00001-of-00002.safetensors" in os.listdir(full)


def _hold(uri: str, barrier, out) -> None:
    """Enter local_dir with the others, note the path and what is in it, leave together."""
    import os

    with storage.local_dir(uri) as d:
        out.put((d, os.stat(d).st_ino, sorted(os.listdir(d))))
        barrier.wait(timeout=60)


def test_s3_dir_is_fetched_once_per_node_and_removed_by_the_last_user(s3_endpoint):
    import multiprocessing as mp
    import os

    uri = f"{s3_endpoint}/model-once"
    storage.write_text(f"{uri}/config.json", "{}")
    ctx = mp.get_context("spawn")  # fresh processes, as Ray workers are
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(uri, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    seen = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({(d, ino) for d, ino, _ in seen}) == 1  # one directory, one download, shared
    assert seen[0][2] == ["config.json"]
    assert not os.path.exists(seen[0][0])  # the last process out deleted it
    with storage.local_dir(uri) as again:  # and a later run fetches it anew
        assert os.listdir(again) == ["config.json"]
    assert not os.path.exists(again)
