"""`cold-ray adapters add/list/show/tune/rm` against a registry file."""

import json

from cold_ray.cli import main


def test_adapters_cli_round_trip(tmp_path, tiny_llama, tiny_adapters, capsys):
    reg = ["--registry", str(tmp_path / "r.sqlite")]
    model = ["--model", str(tiny_llama)]

    def run(*argv):
        rc = main(["adapters", *argv, *reg])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = run("add", "a0", str(tiny_adapters[0]), *model, "--alpha", "0.2", "--json")
    assert rc == 0 and json.loads(out)["alpha"] == 0.2 and json.loads(out)["rank"] == 8
    assert run("add", "../x", str(tiny_adapters[0]), *model)[2].startswith(
        "error: invalid adapter name '../x'"
    )
    rc, _, err = run("add", "big", str(tiny_adapters[1]), *model, "--max-lora-rank", "4")
    assert rc == 2 and "adapter rank 8 exceeds max_lora_rank 4" in err
    rc, _, err = run("add", "a0", str(tiny_adapters[1]), *model)
    assert rc == 2 and "already exists" in err

    rc, out, _ = run("list")
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["NAME", "RANK"]
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["a0"]
    rc, out, _ = run("tune", "a0", "--beta", "1.5", "--no-cold", "--json")
    assert rc == 0 and (json.loads(out)["beta"], json.loads(out)["cold_enabled"]) == (1.5, False)
    rc, out, _ = run("show", "a0")
    assert rc == 0 and "cold_enabled" in out and "False" in out
    assert run("rm", "a0")[0] == 0
    rc, _, err = run("show", "a0")
    assert rc == 2 and "does not exist" in err
    rc, out, _ = run("list", "--json")
    assert json.loads(out) == []
