"""Typed dataclass configs: nested dicts, YAML files and `--set a.b=c` overrides.

Every run writes its fully resolved config (every default spelled out) to `config.yaml`, and any
config can be rebuilt from that file. Field types are read from the dataclass annotations, so an
override like `--set grpo.lr=2e-6` is parsed as a float and a typo names the unknown field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
  """A config field that does not exist or a value of the wrong type; names the field."""


def to_dict(cfg: Any) -> Any:
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, Mapping):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def _coerce(tp: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(a, value, where)
      except (ConfigError, TypeError, ValueError) as e:
        errors.append(str(e))
    raise ConfigError(f"{where}: {value!r} matches none of {tp}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
    return from_dict(tp, value, where)
  if origin in (tuple, list):
    if isinstance(value, str):
      value = [v for v in value.split(",") if v != ""]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    inner = args[0] if args else Any
    seq = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(seq) if origin is tuple else seq
  if origin is dict or tp is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)
  if origin is typing.Literal:
    if value not in args:
      raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    return value
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
      return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
      return False
    raise ConfigError(f"{where}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, bool):
      raise ConfigError(f"{where}: expected an int, got {value!r}")
    if isinstance(value, float):
      if value.is_integer():
        return int(value)
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
      return int(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{where}: expected an int, got {value!r}") from None
  if tp is float:
    try:
      return float(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{where}: expected a number, got {value!r}") from None
  if tp is str:
    if value is None:
      raise ConfigError(f"{where}: expected a string, got null")
    return str(value)
  return value


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
  """Builds dataclass `cls` from a (partial) mapping; unknown keys are errors naming the field."""
  hints = _hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in data.items():
    path = f"{where}.{k}" if where else k
    if k not in names:
      raise ConfigError(f"unknown config field {path!r}; known: {sorted(names)}")
    kwargs[k] = _coerce(hints[k], v, path)
  return cls(**kwargs)


def merge(cfg: T, updates: Mapping[str, Any], where: str = "") -> T:
  """Returns `cfg` with nested `updates` applied (a partial dict tree)."""
  hints = _hints(type(cfg))
  names = {f.name for f in dataclasses.fields(cfg)}
  changes = {}
  for k, v in updates.items():
    path = f"{where}.{k}" if where else k
    if k not in names:
      raise ConfigError(f"unknown config field {path!r}; known: {sorted(names)}")
    cur = getattr(cfg, k)
    if dataclasses.is_dataclass(cur) and isinstance(v, Mapping):
      changes[k] = merge(cur, v, path)
    else:
      changes[k] = _coerce(hints[k], v, path)
  return dataclasses.replace(cfg, **changes)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
  """`["grpo.lr=1e-6", "mesh.fsdp=8"]` -> nested dict; values parsed as YAML scalars."""
  tree: dict[str, Any] = {}
  for item in items or []:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def load_yaml(path: str) -> dict[str, Any]:
  """A YAML file's config sections (a local path or a gs:// URI: cqr_jax/paths.py)."""
  from cqr_jax import paths
  with paths.open_file(path) as f:
    data = yaml.safe_load(f) or {}
  if not isinstance(data, Mapping):
    raise ConfigError(f"{path}: the top level must be a mapping of config sections")
  return dict(data)


def to_yaml(cfg: Any) -> str:
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_yaml(cfg: Any, path: str) -> None:
  from cqr_jax import paths
  with paths.open_file(path, "w") as f:
    f.write(to_yaml(cfg))


def field_docs(cls) -> dict[str, str]:
  """{field: one-line description} from a dataclass's source: a field's trailing `# comment`,
  else the comment lines just above it, else its line in the class docstring (`name: text`)."""
  import inspect
  try:
    src = inspect.getsource(cls).splitlines()
  except (OSError, TypeError):
    return {}
  doc = inspect.getdoc(cls) or ""
  out, above = {}, []
  for line in src:
    s = line.strip()
    m = re.match(r"^(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#\s*(.*))?$", s)
    if s.startswith("#"):
      above.append(s.lstrip("# ").strip())
    elif m and not s.startswith(("def ", "class ", "return")):
      text = m.group(2) or " ".join(above)
      if not text:
        d = re.search(rf"^\s*{m.group(1)}:\s*(.+)$", doc, re.M)
        text = d.group(1) if d else ""
      out[m.group(1)] = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0][:110]
      above = []
    else:
      above = []
  return out


def field_help(cls, prefix: str = "", docs: bool = True, extra: Mapping[str, str] | None = None
               ) -> list[str]:
  """One line per leaf field: `section.field = value  # description`, for `--help` and
  `--print-config` (a class gives its defaults, an instance its values)."""
  lines = []
  inst = cls() if isinstance(cls, type) else cls
  desc = field_docs(type(inst)) if docs else {}
  for f in dataclasses.fields(inst):
    v = getattr(inst, f.name)
    path = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(v):
      lines += field_help(v, path + ".", docs, extra)
    else:
      line = f"  {path} = {json.dumps(to_dict(v))}"
      text = desc.get(f.name) or (extra or {}).get(path, "")
      lines.append(f"{line:<48}  # {text}" if text else line)
  return lines
