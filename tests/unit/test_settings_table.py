"""README's configuration tables and `Settings` agree: every setting is documented as its
upper-case environment variable, in the table of the same group as its block in
service/config.py, and every documented variable that is not an explicitly listed tooling
variable is a setting."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]

# Read outside `Settings` (by the sandbox, `make run`, the CLI or prometheus_client); README
# may document them, and a variable not listed here must be a setting.
NOT_SETTINGS = {
    "SANDBOX_CONTROL_TOKEN", "SANDBOX_PORT", "SANDBOX_WEBHOOK_SECRET", "PROMETHEUS_MULTIPROC_DIR",
    "RESEARCH_DATA_DIR", "RESEARCH_API_URL", "RESEARCH_API_KEY", "API_BIND", "PORT",
}
# The groups' names: the `# --- Name: …` headers in config.py, the `**Name**` lines in README.
GROUPS = ("Production", "Limits", "Tuning", "Test timing knobs")


def config_groups() -> dict[str, str]:
    """Each Settings field's group, from the block headers in service/config.py."""
    source = (ROOT / "service" / "config.py").read_text()
    body = source[source.index("class Settings("):source.index("@classmethod")]
    group, found = "", {}
    for line in body.splitlines():
        if header := re.match(r"\s+# --- ([^:]+):", line):
            group = header.group(1)
        elif field := re.match(r"    ([a-z_0-9]+): ", line):
            found[field.group(1)] = group
    return found


def readme_groups() -> dict[str, str]:
    """Each variable in README's configuration section, with the `**Group**` above its table."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Configuration"):]
    section = section[:section.index("\n## ", 1)]
    group, found = "", {}
    for line in section.splitlines():
        if heading := re.match(r"\*\*([^*]+)\*\*", line):
            group = heading.group(1)
        elif line.startswith("| `"):
            for variable in re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1]):
                found[variable] = group
    return found


def test_the_readme_documents_every_setting_in_its_group() -> None:
    documented = readme_groups()
    for name, group in config_groups().items():
        assert name.upper() in documented, f"{name.upper()} is a setting missing from README"
        assert documented[name.upper()] == group, (
            f"{name.upper()}: README lists it under {documented[name.upper()]!r}, "
            f"config.py under {group!r}"
        )


def test_every_documented_variable_is_a_setting_or_a_listed_tooling_one() -> None:
    settings = {name.upper() for name in Settings.__struct_fields__}
    unknown = set(readme_groups()) - settings - NOT_SETTINGS
    assert not unknown, f"README documents variables Settings does not read: {sorted(unknown)}"


def test_the_groups_are_the_documented_four_in_order() -> None:
    fields = config_groups()
    assert set(fields) == set(Settings.__struct_fields__)  # the parser saw every field
    assert list(dict.fromkeys(fields.values())) == list(GROUPS)
    readme = [g for g in dict.fromkeys(readme_groups().values()) if g in GROUPS]
    assert readme == list(GROUPS)
