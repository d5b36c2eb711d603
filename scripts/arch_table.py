"""The README's architecture table, from the architecture entries (src/loramerge/formats/archs/).

    python scripts/arch_table.py

tests/test_layout.py checks that the README holds exactly this output.
"""

from __future__ import annotations

from loramerge.formats import archs


def table() -> str:
    lines = ["| `--arch` | model | variants (key tables) | components | reads | writes (default **bold**) |",
             "|---|---|---|---|---|---|"]
    for row in archs.describe():
        labels = sorted({entry.split(":")[0] for entry in row["reads"]})
        writes = ", ".join(f"**{f}**" if f == row["default_format"] else f for f in row["writes"])
        lines.append(f"| `{row['name']}` | {row['label']} | {', '.join(row['variants'])} | "
                     f"{', '.join(row['components'])} | {', '.join(labels)} | {writes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
