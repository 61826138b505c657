"""A small name -> function registry so every objective choice is a config string."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
  """Maps names (and aliases) to functions; unknown names raise a KeyError listing the choices."""

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: dict[str, F] = {}
    self._aliases: dict[str, str] = {}

  def register(self, name: str, *aliases: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
      if name in self._fns or name in self._aliases:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._fns[name] = fn
      for a in aliases:
        self._aliases[a] = name
      return fn
    return deco

  def canonical(self, name: str) -> str:
    if name in self._fns:
      return name
    if name in self._aliases:
      return self._aliases[name]
    choices = sorted(self._fns) + sorted(f"{a} (= {n})" for a, n in self._aliases.items())
    raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(choices)}")

  def get(self, name: str) -> F:
    return self._fns[self.canonical(name)]

  def names(self) -> list[str]:
    return sorted(self._fns)

  def __contains__(self, name: str) -> bool:
    return name in self._fns or name in self._aliases
