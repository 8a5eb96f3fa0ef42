"""The Windows agent (agents/windows/ecoflow-agent.ps1) as far as it can be checked without
PowerShell: its canonical form, its fixed commands and its service definition. It is not run."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from tests.agent_scenarios import REPO, SIGNED_FIELDS, VECTORS, canonical

SCRIPT = (REPO / "agents" / "windows" / "ecoflow-agent.ps1").read_text()
TASK = REPO / "agents" / "windows" / "ecoflow-agent-task.xml"


def test_canonical_form_lists_the_contract_fields_in_order():
    body = re.search(r"function Get-Canonical\(\$C\) \{(.*?)\n\}", SCRIPT, re.S).group(1)
    fields = re.findall(r"\$C\.(\w+)", body)
    assert re.search(r"@\('ecoflow-cmd-v1',", body)
    assert tuple(fields) == SIGNED_FIELDS
    assert '-join "`n"' in body


def test_shared_vectors_follow_the_same_canonical_form():
    for vector in VECTORS:
        assert canonical(vector["command"]) == vector["canonical"]


def test_signature_is_hmac_sha256_over_utf8_as_lowercase_hex():
    body = re.search(r"function Get-Signature.*?\n\}", SCRIPT, re.S).group(0)
    assert "HMACSHA256" in body and body.count("[Text.Encoding]::UTF8.GetBytes") == 2
    assert "ToString('x2')" in body


def test_only_fixed_commands_are_run():
    runs = re.findall(r"Run-Step '(\w+)' \$\w+ '([\w.]+)' @\(([^)]*)\)", SCRIPT)
    assert {(step, exe) for step, exe, _ in runs} == {("shutdown", "shutdown.exe"),
                                                        ("abort", "shutdown.exe")}
    assert "Invoke-Expression" not in SCRIPT and "iex " not in SCRIPT


def test_retained_commands_and_persistent_session_are_requested():
    for flag in ("'-c'", "'-i', $ClientId", "'-q', '1'", "'--retain-as-published'",
                 "'--will-retain'"):
        assert flag in SCRIPT


def test_task_runs_as_system_at_startup():
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    root = ET.parse(TASK).getroot()
    assert root.find(".//t:BootTrigger", ns) is not None
    assert root.find(".//t:Principal/t:UserId", ns).text == "S-1-5-18"
    assert "ecoflow-agent.ps1" in root.find(".//t:Exec/t:Arguments", ns).text
