"""The plugin's table of vLLM symbols, checked statically against a vLLM's sources.

The installed vLLM passes; a copy of its sources with one symbol removed, one signature changed
or one attribute no longer mentioned is reported by name (from a directory and from a wheel),
and the CLI exits 1 on it, 0 on the original."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from sora_serve.vllm_plugin import compat


@pytest.fixture(scope="module")
def installed() -> Path:
    import vllm

    return Path(vllm.__file__).parent


@pytest.fixture()
def source_copy(installed, tmp_path) -> Path:
    """vLLM's Python sources (nothing else) copied under tmp_path/vllm."""
    shutil.copytree(
        installed,
        tmp_path / "vllm",
        ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir())],
    )
    return tmp_path


def edit(root: Path, module: str, old: str, new: str) -> None:
    path = root / module
    text = path.read_text()
    assert old in text, f"{module} no longer has {old!r}: update the test"
    path.write_text(text.replace(old, new, 1))


def test_the_installed_vllm_has_every_symbol(installed):
    assert [(s.target, issues) for s, issues in compat.report(installed.parent) if issues] == []
    compat.check_installed()  # what register() runs at start
    assert compat.main([str(installed.parent)]) == 0


def test_every_patch_is_listed_with_its_reason():
    uses = {s.use for s in compat.SYMBOLS}
    assert uses <= {"subclassed", "overridden", "called", "wrapped", "replaced"}
    assert all(s.why.strip() for s in compat.SYMBOLS)
    assert len({s.target for s in compat.SYMBOLS}) == len(compat.SYMBOLS), "each symbol once"


def test_a_changed_vllm_is_reported_by_symbol(source_copy, capsys):
    # A seam vanishes, a subclass hook gains a required parameter, an attribute read at run time is renamed.
    edit(source_copy, "vllm/lora/utils.py", "_all_lora_classes: tuple", "_lora_classes: tuple")
    edit(
        source_copy,
        "vllm/lora/layers/base_linear.py",
        "def set_lora(\n        self,",
        "def set_lora(\n        self,\n        slot_mapping,",
    )
    mentioned = next(s for s in compat.SYMBOLS if s.mentions)
    module_file = source_copy / (mentioned.module.replace(".", "/") + ".py")
    if not module_file.exists():
        module_file = source_copy / mentioned.module.replace(".", "/") / "__init__.py"
    module_file.write_text(module_file.read_text().replace(mentioned.mentions[0], "renamed_attribute"))

    issues = {s.target: found for s, found in compat.report(source_copy) if found}
    assert issues["vllm.lora.utils:_all_lora_classes"] == ["vllm.lora.utils:_all_lora_classes is missing"]
    changed = [
        t for t, found in issues.items() if t.endswith(".set_lora") and any("parameters changed" in f for f in found)
    ]
    assert changed, issues  # every plugin class inherits set_lora from base_linear
    assert any(f"no longer mentions '{mentioned.mentions[0]}'" in f for f in issues[mentioned.target]), issues

    assert compat.main([str(source_copy)]) == 1
    printed = capsys.readouterr()
    assert "vllm.lora.utils:_all_lora_classes is missing" in printed.out
    assert f"{len(compat.SYMBOLS) - len(issues)} of {len(compat.SYMBOLS)} symbols compatible" in printed.err


def test_a_wheel_is_read_without_installing_it(source_copy, tmp_path):
    edit(source_copy, "vllm/lora/utils.py", "_all_lora_classes: tuple", "_lora_classes: tuple")
    wheel = tmp_path / "vllm-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in (source_copy / "vllm").rglob("*.py"):
            archive.write(path, path.relative_to(source_copy).as_posix())
    issues = [issue for _s, found in compat.report(wheel) for issue in found]
    assert issues == ["vllm.lora.utils:_all_lora_classes is missing"]


def test_not_a_vllm_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        compat.main([str(tmp_path)])
    assert exited.value.code == 2
    assert "neither a wheel nor a directory containing vllm/" in capsys.readouterr().err


def test_a_symbol_moved_to_a_known_alternative_is_compatible(source_copy):
    """vLLM's newer model runner (the only one in 0.34) keeps a request's adapter in `LoraState`,
    not the old InputBatch: the plugin reads either, so either one present is compatible; neither is reported."""
    (source_copy / "vllm/v1/worker/gpu_input_batch.py").unlink()
    (source_copy / "vllm/v1/worker/gpu/lora_utils.py").unlink()
    target = "vllm.v1.worker.gpu_input_batch:InputBatch"
    assert dict((s.target, found) for s, found in compat.report(source_copy))[target] == [f"{target} is missing"]
    (source_copy / "vllm/v1/worker/gpu/lora_utils.py").write_text("class LoraState:\n    lora_requests: dict\n")
    assert dict((s.target, found) for s, found in compat.report(source_copy))[target] == []
