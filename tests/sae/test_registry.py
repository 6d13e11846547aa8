"""sae.registry: a registry that loses nothing (dangling, half-replaced and moved entries: test_integrity.py)."""

import threading

from sae.registry import read_registry, register_dataset


def test_concurrent_registrations_all_land(tmp_path):
    run = tmp_path / "run"

    def register(i):
        for j in range(10):
            register_dataset(run, f"set_{i}_{j}", tmp_path / f"p{i}{j}", {"kind": "sae"})

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_registry(run)) == 40
