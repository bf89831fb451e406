import dataclasses
import json
from pathlib import Path

import pytest

from autoshard.cost import BUILTIN_PROFILES, HardwareProfile, LinkProfile, get_profile
from autoshard.cost.hardware import CPU_GLOO, H100_SXM


def _calibrated_like() -> HardwareProfile:
    link = LinkProfile("lo", 4e-4, 2e9, {"reduce_scatter": (5e-4, 4e8), "all_gather": (3e-4, 1e9)})
    return dataclasses.replace(CPU_GLOO, name="cpu-gloo-calibrated", intra_node=link, inter_node=link)


@pytest.mark.parametrize("profile", [*BUILTIN_PROFILES.values(), _calibrated_like()], ids=lambda p: p.name)
def test_json_round_trip_is_exact(profile):
    text = profile.to_json()
    json.loads(text)  # plain JSON
    back = HardwareProfile.from_json(text)
    assert back == profile
    assert isinstance(next(iter(back.intra_node.per_kind.values()), (0, 0)), tuple)
    assert hash(back) == hash(profile)  # usable as a cache key despite the dict fields


def test_get_profile_by_name_alias_and_profile():
    assert get_profile("h100-sxm") is H100_SXM
    assert get_profile("h100") is H100_SXM
    assert get_profile("H100") is H100_SXM
    assert get_profile("a100").name == "a100-sxm"
    assert get_profile("pcie-gpu").intra_node.busbw_bytes_per_s < get_profile("a100").intra_node.busbw_bytes_per_s
    assert get_profile(H100_SXM) is H100_SXM


def test_get_profile_by_path(tmp_path: Path):
    p = _calibrated_like()
    f = tmp_path / "mine.json"
    p.save(f)
    assert get_profile(f) == p
    assert get_profile(str(f)) == p
    # calibrate stores raw measurements next to the profile; loading ignores them
    doc = json.loads(f.read_text()) | {"measurements": {"comm": {}}}
    f.write_text(json.dumps(doc))
    assert get_profile(f) == p


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        get_profile("tpu-v9")
    for name in ("h100-sxm", "a100-sxm", "pcie-gpu", "cpu-gloo", "h100"):
        assert name in str(e.value)


def test_missing_file_and_bad_keys_are_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        get_profile(str(tmp_path / "nope.json"))
    doc = H100_SXM.to_dict() | {"efficency": 0.5}  # typo must not pass silently
    with pytest.raises(ValueError, match="efficency"):
        HardwareProfile.from_dict(doc)


def test_validation():
    with pytest.raises(ValueError):
        dataclasses.replace(H100_SXM, efficiency=0.0)
    with pytest.raises(ValueError, match="all_gahter"):
        LinkProfile("x", 1e-6, 1e9, {"all_gahter": (1e-6, 1e9)})
    with pytest.raises(ValueError):
        LinkProfile("x", 1e-6, 0.0)


def test_h100_constants_match_sources():
    # FIELD.md §3: ~370 GB/s NCCL ring busbw (nccl-tests#212), 50 GB/s NDR per GPU,
    # 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB; autoparallel's eff 0.7 and 7 us.
    p = get_profile("h100")
    assert p.intra_node.busbw_bytes_per_s == 370e9
    assert p.inter_node.busbw_bytes_per_s == 50e9
    assert p.peak_flops["bfloat16"] == 989e12
    assert p.mem_bw_bytes_per_s == 3.35e12
    assert p.device_memory_bytes == 80 * 2**30
    assert (p.efficiency, p.launch_overhead_s, p.devices_per_node) == (0.7, 7e-6, 8)
