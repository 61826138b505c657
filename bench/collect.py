"""Writes BENCHMARKS.md: the current table (bench/results/_summary.md) and an index of the result
files, one line each (its title), so the details stay in their own files."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def title(path: str) -> str:
  """The file's first heading, without its #s."""
  with open(path) as f:
    for line in f:
      if line.startswith("#"):
        return line.lstrip("#").strip()
  return os.path.basename(path)


def render() -> str:
  head = open(os.path.join(RESULTS, "_summary.md")).read().rstrip() + "\n"
  names = sorted(f for f in os.listdir(RESULTS) if f.endswith(".md") and not f.startswith("_"))
  lines = [f"- [{n}](bench/results/{n}): {title(os.path.join(RESULTS, n))}" for n in names]
  return head + "\n## Result files\n\n" + "\n".join(lines) + "\n"


def main() -> None:
  with open(os.path.join(HERE, "..", "BENCHMARKS.md"), "w") as f:
    f.write(render())


if __name__ == "__main__":
  main()
