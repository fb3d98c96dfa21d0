"""``python -m fints_repro.export``: a run's user-level vectors written as a llama.cpp
control vector (GGUF, read back with the ``gguf`` package) and as safetensors with a JSON
header, each equal to the vectors the run adds (recomputed here through the stages)."""

from __future__ import annotations

import json

import pytest
import torch

from fints_repro.errors import ConfigError


@pytest.fixture
def resid_caa(tiny_overrides):
    return ["+exp=demo", *tiny_overrides, "steering.sites=[resid]", "steering.gamma=2.0",
            "steering.layer=1"]


def _expected(overrides, method_name):
    from fints_repro import stages
    from fints_repro.backbones import build_backbone
    from fints_repro.export import pick_method

    ctx = stages.open_run(overrides)
    method = pick_method(ctx.cfg, overrides, method_name)
    plan = stages.steering_plan(ctx, method, build_backbone(method.backbone, ctx.task, ctx.retriever),
                                ctx.model(None))
    out = {}
    for i, s in enumerate(ctx.samples):
        if plan.steered[i]:
            out[s.user] = plan.vectors[(1, "resid")][i].float()
    return out


def test_gguf_and_safetensors_hold_each_users_vector(resid_caa, tmp_path) -> None:
    import gguf
    from safetensors import safe_open

    from fints_repro.export import main

    assert main(["--out", str(tmp_path / "out"), "--method", "rag+caa(ours)", *resid_caa]) == 0
    expected = _expected(resid_caa, "rag+caa(ours)")
    assert len(expected) >= 2
    for user, v in expected.items():
        reader = gguf.GGUFReader(str(tmp_path / "out" / f"{user}.gguf"))
        fields = {f.name: f for f in reader.fields.values()}
        assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
        assert bytes(fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
        assert int(fields["controlvector.layer_count"].parts[-1][0]) == 1
        assert [t.name for t in reader.tensors] == ["direction.1"]
        assert torch.equal(torch.from_numpy(reader.tensors[0].data.copy()), v)
    with safe_open(str(tmp_path / "out" / "vectors.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["fints_repro"])
        assert sorted(f.keys()) == sorted(f"{u}/layer1.resid" for u in expected)
        for user, v in expected.items():
            assert torch.equal(f.get_tensor(f"{user}/layer1.resid"), v)
    assert meta["sites"] == ["resid"] and meta["layers"] == [1] and meta["method"] == "caa"
    assert meta["recipe"]["gamma"] == 2.0 and meta["users"] == sorted(expected)


def test_vectors_chosen_per_input_or_off_the_residual_stream_are_refused(resid_caa, tmp_path) -> None:
    from fints_repro.export import export

    with pytest.raises(ConfigError, match=r"the run's methods are .*name the steered one"):
        export(resid_caa, tmp_path / "a", ["safetensors"])
    with pytest.raises(ConfigError, match=r"method 'rag' is unsteered"):
        export(resid_caa, tmp_path / "a", ["safetensors"], "rag")
    attn = [*resid_caa, "steering.sites=[attn,mlp]"]
    with pytest.raises(ConfigError, match=r"residual stream at every position; this run's vectors "
                                          r"are at \['attn', 'mlp'\]"):
        export(attn, tmp_path / "b", ["gguf"], "rag+caa(ours)")
    assert not (tmp_path / "b").exists()


def test_one_vector_per_user_or_an_error_naming_the_user() -> None:
    from types import SimpleNamespace

    from fints_repro.export import user_vectors

    users = [SimpleNamespace(user=u) for u in ("a", "a", "b", "c")]
    v = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    plan = SimpleNamespace(vectors={(2, "resid"): v}, steered=[True, True, True, False])
    got = user_vectors(plan, users)
    assert sorted(got) == ["a", "b"]  # c: no pairs, no vector
    assert torch.equal(got["a"][(2, "resid")], v[0]) and torch.equal(got["b"][(2, "resid")], v[2])
    plan.vectors[(2, "resid")] = torch.tensor([[1.0, 2.0], [1.0, 2.5], [3.0, 4.0], [0.0, 0.0]])
    with pytest.raises(ConfigError, match=r"the rows of user 'a' hold different vectors at layer 2 resid"):
        user_vectors(plan, users)
