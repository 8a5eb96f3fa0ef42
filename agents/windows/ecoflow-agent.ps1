<#
.SYNOPSIS
Windows host agent: acts once on a genuine shutdown/abort/test command and acks what it did.

.DESCRIPTION
Windows PowerShell 5.1 (built into Windows) with mosquitto_sub.exe / mosquitto_pub.exe
(Mosquitto 2.0 for Windows) and .NET's HMACSHA256. The contract is docs/command-contract.md;
docs/agent-windows.md explains the design and says what is verified and what is not.

One mosquitto_sub process runs for as long as it stays up: a fixed client id, a persistent
session and its own Last Will; this script reads its output line by line and restarts it when
it exits. Nothing from a payload is ever executed: actions map to the fixed local commands of
Get-ActionPlan, and the only payload value that reaches a command line is the validated
integer delay.

The tables at the top (contract, commands, mosquitto_sub arguments) are read by
tests/test_agent_windows.py, which checks them against the contract, the Linux agent and a
real Mosquitto: keep their one-entry-per-line layout.
#>
param([string]$EnvFile = "$env:ProgramData\EcoflowAgent\agent.env")

$ErrorActionPreference = 'Stop'
$Version = '1.0.0'

# -- contract tables ---------------------------------------------------------------------------
$CanonicalHeader = 'ecoflow-cmd-v1'
$CanonicalSeparator = "`n"
$SignedFields = @('agent', 'id', 'action', 'delay_sec', 'ttl_sec', 'issued_at', 'episode_id', 'cancels', 'reason')
$StringFields = @('id', 'agent', 'action', 'episode_id', 'cancels', 'reason', 'sig')
$IntFields = @('v', 'delay_sec', 'ttl_sec', 'issued_at')
$Actions = @('shutdown', 'abort', 'test')
# Printable ASCII without '"' and '\'; \A..\z so that a trailing line break does not pass.
$SafeText = '\A[\x20\x21\x23-\x5b\x5d-\x7e]*\z'
$AgentIdPattern = '\A[A-Za-z0-9._-]{1,64}\z'
$MaxText = 200
$MaxPayload = 4096
$MaxDelaySec = 86400
$ExecutedRetentionSec = 7 * 86400

# The rejection order of the contract ("What an agent does with a command", steps 1-6). Each
# rule returns something true when the command fails it; Detail is formatted with that value.
$Verdicts = @(
    @{ Name = 'malformed';         Status = 'rejected'; Detail = 'malformed: {0}';                           Fails = { param($c, $x) $c.Problem } }
    @{ Name = 'retained';          Status = 'rejected'; Detail = 'retained';                                 Fails = { param($c, $x) $x.Retained } }
    @{ Name = 'wrong_agent';       Status = 'rejected'; Detail = 'wrong agent';                              Fails = { param($c, $x) $c.F['agent'] -cne $x.AgentId } }
    @{ Name = 'missing_signature'; Status = 'rejected'; Detail = 'missing signature';                        Fails = { param($c, $x) $x.Key -and -not $c.F['sig'] } }
    @{ Name = 'bad_signature';     Status = 'rejected'; Detail = 'bad signature';                            Fails = { param($c, $x) $x.Key -and -not (Test-Signature $x.Key $c.F) } }
    @{ Name = 'expired';           Status = 'expired';  Detail = 'expired';                                  Fails = { param($c, $x) $x.Now -gt $c.F['issued_at'] + $c.F['ttl_sec'] + $x.Skew } }
    @{ Name = 'future';            Status = 'rejected'; Detail = 'issued in the future (check the clocks)';  Fails = { param($c, $x) $c.F['issued_at'] -gt $x.Now + $x.Skew } }
    @{ Name = 'duplicate';         Status = 'rejected'; Detail = 'duplicate';                                Fails = { param($c, $x) $x.Executed.Contains($c.F['id']) } }
)

# -- local commands ----------------------------------------------------------------------------
# Settings split on spaces (no quoting). {delay_sec} / {delay_min} = the window plus the
# pre-shutdown time. /f: with /t 0 Windows would otherwise let an application veto the halt.
# HALT_CMD (optional) runs only at the commit point, after PRE_SHUTDOWN_CMD_1..9; Windows
# refuses a second shutdown while the timer is pending (error 1190), see docs/agent-windows.md.
$DefaultCommands = [ordered]@{
    SHUTDOWN_CMD = 'shutdown.exe /s /f /t {delay_sec}'
    ABORT_CMD    = 'shutdown.exe /a'
    HALT_CMD     = ''
}

# -- mosquitto_sub -----------------------------------------------------------------------------
# No -W: the process runs until the connection is refused or it is killed, and libmosquitto
# reconnects by itself; the Will is published by the broker only when that connection drops.
# Every argument is one plain token, so joining them with spaces is a valid Windows command line.
$SubscriberArgs = @(
    '-c', '-i', '{client_id}', '-x', '{session_expiry}', '-k', '30', '-q', '1',
    '--retain-as-published',
    '-t', '{prefix}/cmd', '-t', '{prefix}/supply', '-t', '{prefix}/status',
    '-F', 'MSG,%t,%r,%x'
)
$SubscriberLine = '\AMSG,([^,]+),([01]),([0-9a-f]*)\z'
# Option file lines (USERPROFILE\mosquitto_sub.conf and mosquitto_pub.conf on Windows builds):
# the password and the Will's JSON never appear on a command line.
$ConnectionOptions = @('-h {host}', '-p {port}', '-u {user}', '-V mqttv5')
$PasswordOption = '-P {password}'
$WillOptions = @('--will-topic {prefix}/status', '--will-qos 1', '--will-retain', '--will-payload {offline_status}')

# -- pure functions ----------------------------------------------------------------------------
function Expand-Template([string]$Text, $Values) {
    foreach ($name in $Values.Keys) { $Text = $Text.Replace('{' + $name + '}', [string]$Values[$name]) }
    return $Text
}

function Get-CanonicalText($C) {
    # docs/command-contract.md, "Canonical form": the values as sent, decimal integers.
    $lines = @($CanonicalHeader) + @(foreach ($field in $SignedFields) { [string]$C[$field] })
    return $lines -join $CanonicalSeparator
}

function Get-Hmac([string]$Key, [string]$Text) {
    $hmac = New-Object System.Security.Cryptography.HMACSHA256 (, [Text.Encoding]::UTF8.GetBytes($Key))
    try { $hash = $hmac.ComputeHash([Text.Encoding]::UTF8.GetBytes($Text)) } finally { $hmac.Dispose() }
    return -join ($hash | ForEach-Object { $_.ToString('x2') })
}

function Test-Signature([string]$Key, $C) {
    $expected = Get-Hmac $Key (Get-CanonicalText $C)
    $given = ([string]$C['sig']).ToLowerInvariant()
    if ($given.Length -cne $expected.Length) { return $false }
    $diff = 0
    for ($i = 0; $i -lt $expected.Length; $i++) { $diff = $diff -bor ([int]$expected[$i] -bxor [int]$given[$i]) }
    return $diff -ceq 0
}

function ConvertTo-Command([string]$Text) {
    # The command as a case-sensitive dictionary (F), or Problem saying what is wrong with it;
    # Id is the id to ack with even when the command is malformed.
    $c = [pscustomobject]@{ Problem = $null; Id = ''; F = $null }
    if ($Text.Length -gt $MaxPayload) { $c.Problem = 'payload too large'; return $c }
    try { $o = $Json.DeserializeObject($Text) } catch { $c.Problem = 'not JSON'; return $c }
    if (-not ($o -is [Collections.Generic.Dictionary[string, object]])) { $c.Problem = 'not a JSON object'; return $c }
    $c.F = $o
    if ($o.ContainsKey('id') -and $o['id'] -is [string] -and $o['id'] -cmatch $SafeText) { $c.Id = $o['id'] }
    foreach ($f in 'episode_id', 'cancels', 'reason') { if (-not $o.ContainsKey($f)) { $o[$f] = '' } }
    foreach ($f in $StringFields) {
        if ($f -ceq 'sig' -and -not $o.ContainsKey($f)) { continue }
        $v = if ($o.ContainsKey($f)) { $o[$f] } else { $null }
        if (-not ($v -is [string])) { $c.Problem = "$f missing or not a string"; return $c }
        if (-not ($v -cmatch $SafeText) -or $v.Length -gt $MaxText) { $c.Problem = "$f has characters outside the contract's alphabet"; return $c }
    }
    foreach ($f in $IntFields) {
        $v = if ($o.ContainsKey($f)) { $o[$f] } else { $null }
        if (-not ($v -is [int] -or $v -is [long])) { $c.Problem = "$f missing or not an integer"; return $c }
    }
    if ($o['v'] -cne 1) { $c.Problem = "unsupported version $($o['v'])" }
    elseif ($o['id'] -ceq '') { $c.Problem = 'id is empty' }
    elseif ($o['action'] -cnotin $Actions) { $c.Problem = "unknown action $($o['action'])" }
    elseif ($o['delay_sec'] -lt 0 -or $o['delay_sec'] -gt $MaxDelaySec) { $c.Problem = 'delay_sec out of range' }
    elseif ($o['ttl_sec'] -lt 1 -or $o['ttl_sec'] -gt $MaxDelaySec) { $c.Problem = 'ttl_sec out of range' }
    if (-not $o.ContainsKey('sig')) { $o['sig'] = '' }
    return $c
}

function Get-Verdict($C, $Context) {
    # The first rule of $Verdicts the command fails, or $null when it may be acted on.
    foreach ($rule in $Verdicts) {
        $why = & $rule.Fails $C $Context
        if ($why) { return [pscustomobject]@{ Name = $rule.Name; Status = $rule.Status; Detail = ($rule.Detail -f $why) } }
    }
    return $null
}

function Split-Command([string]$Text, [int]$DelaySec) {
    $halt = $DelaySec + $PreTimeout * $PreCommands.Count
    $minutes = [int][Math]::Ceiling($halt / 60)
    foreach ($token in ($Text -csplit ' ')) {
        if ($token) { $token.Replace('{delay_sec}', [string]$halt).Replace('{delay_min}', [string]$minutes) }
    }
}

function Get-ActionPlan([string]$Stage, [int]$DelaySec) {
    # The steps (name, argv) each stage runs, from local settings only.
    if ($Stage -ceq 'accept') { [pscustomobject]@{ Step = 'shutdown'; Argv = @(Split-Command $ShutdownCmd $DelaySec) } }
    if ($Stage -ceq 'failsafe') { [pscustomobject]@{ Step = 'failsafe_shutdown'; Argv = @(Split-Command $ShutdownCmd 0) } }
    if ($Stage -ceq 'abort') { [pscustomobject]@{ Step = 'abort'; Argv = @(Split-Command $AbortCmd 0) } }
    if ($Stage -ceq 'commit' -or $Stage -ceq 'failsafe') {
        # A pre-shutdown command is a local setting, run by cmd.exe as the administrator wrote it.
        for ($n = 0; $n -lt $PreCommands.Count; $n++) {
            [pscustomobject]@{ Step = "pre_shutdown_$($PreCommands[$n].N)"; Argv = @('cmd.exe', '/d', '/c', $PreCommands[$n].Text) }
        }
    }
    if ($Stage -ceq 'halt' -and $HaltCmd) { [pscustomobject]@{ Step = 'halt'; Argv = @(Split-Command $HaltCmd 0) } }
}

# -- settings ------------------------------------------------------------------------------------
# KEY=VALUE lines, never evaluated; the process environment wins.
$FileSettings = @{}
if (Test-Path -LiteralPath $EnvFile) {
    foreach ($raw in Get-Content -LiteralPath $EnvFile -Encoding UTF8) {
        $line = $raw.Trim()
        if (-not $line -or $line.StartsWith('#')) { continue }
        if ($line.StartsWith('export ')) { $line = $line.Substring(7).TrimStart() }
        $key, $value = $line -csplit '=', 2
        if ($null -ceq $value) { throw "${EnvFile}: expected KEY=VALUE, got '$line'" }
        $value = $value.Trim()
        if ($value.Length -ge 2 -and $value[0] -ceq $value[-1] -and "'`"".Contains([string]$value[0])) { $value = $value.Substring(1, $value.Length - 2) }
        $FileSettings[$key.Trim()] = $value
    }
}
function Setting([string]$Name, [string]$Default = '') {
    $fromEnv = [Environment]::GetEnvironmentVariable($Name)
    if ($fromEnv) { return $fromEnv.Trim() }
    if ($FileSettings.ContainsKey($Name) -and $FileSettings[$Name]) { return $FileSettings[$Name] }
    return $Default
}
function IntSetting([string]$Name, [int]$Default, [int]$Low, [int]$High) {
    $text = Setting $Name
    if (-not $text) { return $Default }
    $n = 0
    if (-not [int]::TryParse($text, [ref]$n)) { throw "$Name='$text' is not an integer" }
    if ($n -lt $Low -or $n -gt $High) { throw "$Name=$n is out of range $Low..$High" }
    return $n
}
function BoolSetting([string]$Name) { return (Setting $Name).ToLowerInvariant() -cin @('1', 'true', 'yes', 'on') }

$AgentId = Setting 'AGENT_ID'
if ($AgentId -cnotmatch $AgentIdPattern) { throw "AGENT_ID='$AgentId': set it to this host's name in the policy topology (letters, digits, '.', '_', '-')" }
$StateDir = Setting 'STATE_DIR' "$env:ProgramData\EcoflowAgent"
New-Item -ItemType Directory -Force -Path $StateDir | Out-Null
# It holds the MQTT password and the signing key: SYSTEM and Administrators only.
& icacls.exe $StateDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
$LogFile = Join-Path $StateDir 'agent.log'
$TlsCa = Setting 'MQTT_TLS_CA'
$Tls = [bool]$TlsCa -or (BoolSetting 'MQTT_TLS')
$MqttHost = Setting 'MQTT_HOST' 'localhost'
$MqttPort = IntSetting 'MQTT_PORT' $(if ($Tls) { 8883 } else { 1883 }) 1 65535
$MqttUser = Setting 'MQTT_USER' $AgentId
$MqttPass = Setting 'MQTT_PASS'
$SessionExpiry = IntSetting 'MQTT_SESSION_EXPIRY_SEC' 3600 60 604800
$Key = [Environment]::GetEnvironmentVariable('COMMAND_SIGNING_KEY')
if (-not $Key -and $FileSettings.ContainsKey('COMMAND_SIGNING_KEY')) { $Key = $FileSettings['COMMAND_SIGNING_KEY'] }
$Skew = IntSetting 'CLOCK_SKEW_SEC' 60 0 3600
$DryRun = BoolSetting 'DRY_RUN'
$DryRunLog = Setting 'DRY_RUN_LOG' (Join-Path $StateDir 'dry-run.jsonl')
$PreTimeout = IntSetting 'PRE_SHUTDOWN_TIMEOUT_SEC' 60 1 3600
$PreCommands = @(foreach ($n in 1..9) { $t = Setting "PRE_SHUTDOWN_CMD_$n"; if ($t) { [pscustomobject]@{ N = $n; Text = $t } } })
$ShutdownCmd = Setting 'SHUTDOWN_CMD' $DefaultCommands.SHUTDOWN_CMD
$AbortCmd = Setting 'ABORT_CMD' $DefaultCommands.ABORT_CMD
$HaltCmd = Setting 'HALT_CMD' $DefaultCommands.HALT_CMD
$FailsafeAfter = IntSetting 'FAILSAFE_AFTER_SEC' 0 0 86400
$ProbeInterval = IntSetting 'PROBE_INTERVAL_SEC' 30 1 3600
$MosquittoDir = Setting 'MOSQUITTO_DIR' "$env:ProgramFiles\mosquitto"
$MosquittoSub = if (Test-Path -LiteralPath (Join-Path $MosquittoDir 'mosquitto_sub.exe')) { Join-Path $MosquittoDir 'mosquitto_sub.exe' } else { 'mosquitto_sub.exe' }
$MosquittoPub = if (Test-Path -LiteralPath (Join-Path $MosquittoDir 'mosquitto_pub.exe')) { Join-Path $MosquittoDir 'mosquitto_pub.exe' } else { 'mosquitto_pub.exe' }
$HostName = ($env:COMPUTERNAME -creplace '[^A-Za-z0-9._-]', '')
$Prefix = "power-manager/$AgentId"
$ClientId = "ecoflow-agent-$AgentId"
$ExecutedFile = Join-Path $StateDir 'executed-ids.txt'
$CommittedFile = Join-Path $StateDir 'committed-ids.txt'
$PendingFile = Join-Path $StateDir 'pending.json'
$SubscriberPidFile = Join-Path $StateDir 'subscriber.pid'
$ClientConfigDir = Join-Path $StateDir 'mqtt-client'

Add-Type -AssemblyName System.Web.Extensions
$Json = New-Object System.Web.Script.Serialization.JavaScriptSerializer
$StrictUtf8 = New-Object System.Text.UTF8Encoding($false, $true)
$Clock = [Diagnostics.Stopwatch]::StartNew()

# -- effects -------------------------------------------------------------------------------------
function Now { return [DateTimeOffset]::UtcNow.ToUnixTimeSeconds() }
function Log([string]$Level, [string]$Text) {
    $line = '{0} {1} ecoflow-agent: {2}' -f [DateTime]::UtcNow.ToString('yyyy-MM-ddTHH:mm:ssZ'), $Level, $Text
    Add-Content -LiteralPath $LogFile -Value $line -Encoding UTF8
    Write-Host $line
}

function Add-DurableLine([string]$Path, [string]$Line) {
    # Appended and flushed to disk (FlushFileBuffers) before the caller acts.
    $stream = [IO.File]::Open($Path, 'Append', 'Write', 'Read')
    try { $bytes = [Text.Encoding]::UTF8.GetBytes("$Line`r`n"); $stream.Write($bytes, 0, $bytes.Length); $stream.Flush($true) } finally { $stream.Close() }
}

function Write-DurableFile([string]$Path, [string]$Text) {
    $tmp = "$Path.tmp"
    $stream = [IO.File]::Open($tmp, 'Create', 'Write', 'None')
    try { $bytes = [Text.Encoding]::UTF8.GetBytes($Text); $stream.Write($bytes, 0, $bytes.Length); $stream.Flush($true) } finally { $stream.Close() }
    Move-Item -LiteralPath $tmp -Destination $Path -Force
}

function Get-StatusJson([string]$State) {
    return ConvertTo-Json -Compress ([ordered]@{ state = $State; agent = $AgentId; version = $Version; platform = 'windows';
            host = $HostName; ts = (Now); dry_run = [bool]$DryRun })
}

function Write-ClientConfig {
    # Read by mosquitto_sub/pub from %USERPROFILE% (set for them below) on Windows builds.
    New-Item -ItemType Directory -Force -Path $ClientConfigDir | Out-Null
    $values = [ordered]@{ host = $MqttHost; port = $MqttPort; user = $MqttUser; password = $MqttPass; prefix = $Prefix
        offline_status = (Get-StatusJson 'offline') }
    $lines = @($ConnectionOptions | ForEach-Object { Expand-Template $_ $values })
    if ($MqttPass) { $lines += Expand-Template $PasswordOption $values }
    if ($Tls) { $lines += $(if ($TlsCa) { "--cafile $TlsCa" } else { '--tls-use-os-certs' }) }
    # UTF-8 without a byte order mark: a BOM would spoil the first option.
    [IO.File]::WriteAllLines((Join-Path $ClientConfigDir 'mosquitto_pub.conf'), [string[]]$lines)
    $lines += @($WillOptions | ForEach-Object { Expand-Template $_ $values })
    [IO.File]::WriteAllLines((Join-Path $ClientConfigDir 'mosquitto_sub.conf'), [string[]]$lines)
}

function New-ClientProcess([string]$File, [string[]]$Arguments, [switch]$WithStdin) {
    $psi = New-Object Diagnostics.ProcessStartInfo
    $psi.FileName = $File
    $psi.Arguments = $Arguments -join ' '
    $psi.UseShellExecute = $false
    $psi.CreateNoWindow = $true
    $psi.RedirectStandardOutput = $true
    $psi.RedirectStandardError = $true
    $psi.RedirectStandardInput = [bool]$WithStdin
    $psi.EnvironmentVariables['USERPROFILE'] = $ClientConfigDir
    return [Diagnostics.Process]::Start($psi)
}

function Publish([string]$Topic, [string]$Payload, [switch]$Retain) {
    # -s: the payload comes on stdin, so no quoting rules of the Windows command line apply.
    $pubArgs = @('-q', '1', '-t', $Topic, '-s')
    if ($Retain) { $pubArgs += '-r' }
    try {
        $p = New-ClientProcess $MosquittoPub $pubArgs -WithStdin
        $bytes = [Text.Encoding]::UTF8.GetBytes($Payload)
        $p.StandardInput.BaseStream.Write($bytes, 0, $bytes.Length)
        $p.StandardInput.Close()
        $err = $p.StandardError.ReadToEndAsync()
        if (-not $p.WaitForExit(10000)) { $p.Kill(); Log 'ERROR' "publishing to $Topic timed out"; return $false }
        if ($p.ExitCode -cne 0) { Log 'ERROR' "could not publish to ${Topic}: $($err.Result.Trim())"; return $false }
        return $true
    } catch { Log 'ERROR' "could not publish to ${Topic}: $_"; return $false }
}

function Send-Ack([string]$Id, [string]$Status, [string]$Detail) {
    [void](Publish "$Prefix/ack" (ConvertTo-Json -Compress ([ordered]@{ id = $Id; agent = $AgentId; status = $Status;
                    host = $HostName; ts = (Now); detail = $Detail })))
}

function Invoke-Step($Step, [string]$CommandId, [int]$TimeoutSec) {
    # Runs one step of Get-ActionPlan (or records it in dry run); returns $null or what failed.
    $argv = [object[]]$Step.Argv
    if ($DryRun) {
        Add-DurableLine $DryRunLog (ConvertTo-Json -Compress ([ordered]@{ ts = (Now); agent = $AgentId; command_id = $CommandId;
                    step = $Step.Step; argv = $argv }))
        Log 'INFO' "dry run: $($Step.Step) for $CommandId would run $($argv -join ' ')"
        return $null
    }
    Log 'INFO' "$($Step.Step) for ${CommandId}: running $($argv -join ' ')"
    $psi = New-Object Diagnostics.ProcessStartInfo
    $psi.FileName = $argv[0]
    $psi.Arguments = ($argv | Select-Object -Skip 1) -join ' '
    $psi.UseShellExecute = $false
    $psi.CreateNoWindow = $true
    try { $p = [Diagnostics.Process]::Start($psi) } catch { return "$($argv[0]): cannot start ($($_.Exception.Message))" }
    if (-not $p.WaitForExit($TimeoutSec * 1000)) {
        & taskkill.exe /t /f /pid $p.Id | Out-Null
        Log 'ERROR' "$($Step.Step) for ${CommandId}: $($argv[0]) timed out after $TimeoutSec s"
        return "$($argv[0]) timed out after $TimeoutSec s"
    }
    if ($p.ExitCode -cne 0) {
        Log 'ERROR' "$($Step.Step) for ${CommandId}: $($argv[0]) exited $($p.ExitCode)"
        return "$($argv[0]) exited $($p.ExitCode)"
    }
    return $null
}

# -- state ---------------------------------------------------------------------------------------
$Executed = New-Object 'System.Collections.Generic.HashSet[string]'
$Committed = New-Object 'System.Collections.Generic.HashSet[string]'
$Pending = $null            # @{ id; commit_at } while a shutdown is inside its window
$OnBattery = $false         # the last supply state the policy worker retained for this agent
$Connected = $false         # the subscriber delivered something and no probe has gone unanswered since
$DisconnectedSince = $null  # $Clock seconds when a connection that was up was found lost
$LastHeard = 0.0            # $Clock seconds of the subscriber's last line
$ProbeSentAt = $null        # $Clock seconds of a status publish whose echo is awaited
$FailsafeFired = $false

function Remember([string]$Id) {
    Add-DurableLine $ExecutedFile "$Id`t$(Now)"
    [void]$Executed.Add($Id)
}

function Restore-State {
    $keep = @()
    if (Test-Path -LiteralPath $ExecutedFile) {
        foreach ($line in Get-Content -LiteralPath $ExecutedFile -Encoding UTF8) {
            # A torn last line from a crash mid-write: that id was not acted on.
            if ($line -cmatch '\A(.+)\t(\d+)\z' -and (Now) - [long]$Matches[2] -lt $ExecutedRetentionSec) {
                [void]$Executed.Add($Matches[1]); $keep += $line
            }
        }
        Write-DurableFile $ExecutedFile ($(if ($keep) { ($keep -join "`r`n") + "`r`n" } else { '' }))
    }
    if (Test-Path -LiteralPath $CommittedFile) { foreach ($id in Get-Content -LiteralPath $CommittedFile -Encoding UTF8) { [void]$Committed.Add($id) } }
    if (Test-Path -LiteralPath $PendingFile) {
        try {
            $saved = $Json.DeserializeObject((Get-Content -LiteralPath $PendingFile -Raw -Encoding UTF8))
            $script:Pending = @{ id = [string]$saved['id']; commit_at = [double]$saved['commit_at'] }
            Log 'INFO' "resuming the window of shutdown $($Pending.id)"
        } catch { Log 'ERROR' "ignoring unreadable $PendingFile" }
    }
    if (Test-Path -LiteralPath $SubscriberPidFile) {
        # A subscriber left by an agent that died would hold the session: end it.
        $old = Get-Process -Id ([int](Get-Content -LiteralPath $SubscriberPidFile)) -ErrorAction SilentlyContinue
        if ($old -and $old.ProcessName.ToLowerInvariant() -ceq 'mosquitto_sub') { Stop-Process -Id $old.Id -Force }
    }
}

# -- decisions -----------------------------------------------------------------------------------
function Receive-Command([string]$Text, [bool]$Retained) {
    $c = ConvertTo-Command $Text
    $context = @{ Retained = $Retained; AgentId = $AgentId; Key = $Key; Now = (Now); Skew = $Skew; Executed = $Executed }
    $verdict = Get-Verdict $c $context
    if ($c.Problem) { $where = "command '$($c.Id)'" } else { $where = "command $($c.Id) ($($c.F['action']), episode $(if ($c.F['episode_id']) { $c.F['episode_id'] } else { '-' }))" }
    if ($verdict) {
        Log $(if ($verdict.Name -ceq 'duplicate') { 'INFO' } else { 'WARNING' }) "$where $($verdict.Status): $($verdict.Detail)"
        Send-Ack $c.Id $verdict.Status $verdict.Detail
        return
    }
    $id = $c.F['id']
    $now = $context.Now
    switch -CaseSensitive ($c.F['action']) {
        'abort' {
            $target = $c.F['cancels']
            if ($Committed.Contains($target) -or ($Pending -and $Pending.id -ceq $target -and $now -ge $Pending.commit_at)) {
                Log 'WARNING' "$where refused: shutdown $target is past its commit point"
                Send-Ack $id 'rejected' 'abort after commit point'; return
            }
            if (-not $Pending -or $Pending.id -cne $target) {
                Log 'WARNING' "$where rejected: no pending shutdown '$target'"
                Send-Ack $id 'rejected' "no pending shutdown '$target'"; return
            }
            Remember $id
            $script:Pending = $null
            Remove-Item -LiteralPath $PendingFile -Force -ErrorAction SilentlyContinue
            $err = $null
            foreach ($step in Get-ActionPlan 'abort' 0) { if (-not $err) { $err = Invoke-Step $step $id 60 } }
            # The agent's window is cancelled either way; the OS timer may still run.
            if ($err) { Send-Ack $id 'rejected' "ABORT_CMD failed: $err"; return }
            Log 'INFO' "${where}: shutdown $target aborted"
            Send-Ack $id 'aborted' ("cancelled $target" + $(if ($DryRun) { ' (dry run)' } else { '' }))
        }
        'test' {
            Remember $id
            Log 'INFO' "$where accepted: test"
            Send-Ack $id 'received' ('test ok: would run ' + ((Get-ActionPlan 'accept' 0).Argv -join ' '))
        }
        'shutdown' {
            if ($Pending) {
                Log 'WARNING' "$where rejected: shutdown $($Pending.id) already scheduled"
                Send-Ack $id 'rejected' "shutdown $($Pending.id) already pending"; return
            }
            Remember $id
            Log 'INFO' "$where accepted: $(if ($c.F['reason']) { $c.F['reason'] } else { 'no reason given' })"
            $delay = [int]$c.F['delay_sec']
            # The OS timer is set first, so the host halts even if this agent dies in the window.
            $err = $null
            foreach ($step in Get-ActionPlan 'accept' $delay) { if (-not $err) { $err = Invoke-Step $step $id 60 } }
            if ($err) { Send-Ack $id 'rejected' "SHUTDOWN_CMD failed: $err"; return }
            $commitAt = $now + $delay
            $script:Pending = @{ id = $id; commit_at = $commitAt }
            Write-DurableFile $PendingFile (ConvertTo-Json -Compress $Pending)
            $status = if ($DryRun) { 'dry_run' } else { 'scheduled' }
            Log 'INFO' "$where ${status}: commit point in $delay s"
            Send-Ack $id $status "shutdown in $delay s; abort possible until $commitAt"
        }
    }
}

function Invoke-Commit {
    $id = $Pending.id
    $script:Pending = $null
    [void]$Committed.Add($id)
    Add-DurableLine $CommittedFile $id
    Remove-Item -LiteralPath $PendingFile -Force -ErrorAction SilentlyContinue
    Log 'INFO' "shutdown $id reached its commit point: no abort from now on"
    $failures = @()
    foreach ($step in Get-ActionPlan 'commit' 0) {
        $err = Invoke-Step $step $id $PreTimeout
        if ($err) { $failures += "PRE_SHUTDOWN_CMD_$($step.Step.Substring(13)): $err" }
    }
    $detail = if ($failures) { $failures -join '; ' } else { "$($PreCommands.Count) ok" }
    Send-Ack $id $(if ($DryRun) { 'dry_run' } else { 'executing' }) "commit point reached; pre-shutdown: $detail"
    foreach ($step in Get-ActionPlan 'halt' 0) { [void](Invoke-Step $step $id 60) }
}

function Invoke-Failsafe {
    $script:FailsafeFired = $true
    Log 'CRITICAL' "fail-safe: on battery and no broker for $FailsafeAfter s: shutting down"
    foreach ($step in @(Get-ActionPlan 'failsafe' 0) + @(Get-ActionPlan 'halt' 0)) {
        [void](Invoke-Step $step 'failsafe' $(if ($step.Step -clike 'pre_shutdown_*') { $PreTimeout } else { 60 }))
    }
}

# -- liveness --------------------------------------------------------------------------------------
# The subscriber follows this agent's own retained status. A status it delivers proves that its
# connection, and so its Will, is up: "offline" (announced at start, or the Will after a lost
# connection) is answered with "online". When nothing has arrived for PROBE_INTERVAL_SEC the
# current state is published again as a probe; no echo within PROBE_INTERVAL_SEC means the
# connection is lost (D9 counts from then) and "offline" is published while it is.
function Send-Probe {
    $state = if ($Connected) { 'online' } else { 'offline' }
    [void](Publish "$Prefix/status" (Get-StatusJson $state) -Retain)
    $script:ProbeSentAt = $Clock.Elapsed.TotalSeconds
}

function Set-Lost([string]$Why) {
    if ($Connected) {
        Log 'WARNING' "lost the broker ($Why)"
        $script:Connected = $false
        $script:DisconnectedSince = $Clock.Elapsed.TotalSeconds
    }
}

function Receive-Line([string]$Line) {
    if ($Line -cnotmatch $SubscriberLine) { if ($Line) { Log 'WARNING' "mosquitto_sub: $Line" }; return }
    $topic, $retained, $hex = $Matches[1], ($Matches[2] -ceq '1'), $Matches[3]
    if (-not $Connected) { Log 'INFO' "connected and subscribed to $Prefix/cmd as $MqttUser" }
    $script:Connected = $true
    $script:DisconnectedSince = $null
    $script:LastHeard = $Clock.Elapsed.TotalSeconds
    $script:ProbeSentAt = $null
    if ($hex.Length -gt 2 * $MaxPayload) { $text = 'x' * ($MaxPayload + 1) }
    else {
        $bytes = [byte[]]@(for ($i = 0; $i -lt $hex.Length; $i += 2) { [Convert]::ToByte($hex.Substring($i, 2), 16) })
        try { $text = $StrictUtf8.GetString($bytes) } catch { $text = '' }
    }
    if ($topic -ceq "$Prefix/status") {
        if ($text -cmatch '"state"\s*:\s*"offline"') { Send-Probe }
    } elseif ($topic -ceq "$Prefix/supply") {
        try { $state = $Json.DeserializeObject($text) } catch { Log 'WARNING' 'ignoring malformed supply state'; return }
        # Only a JSON true counts, as in the Linux agent.
        $onBattery = $state -is [Collections.Generic.Dictionary[string, object]] -and $state.ContainsKey('on_battery') -and
            $state['on_battery'] -is [bool] -and $state['on_battery']
        if ($onBattery -cne $OnBattery) { Log 'INFO' "supply is $(if ($onBattery) { 'on battery' } else { 'on grid' })" }
        $script:OnBattery = [bool]$onBattery
    } elseif ($topic -ceq "$Prefix/cmd") {
        try { Receive-Command $text $retained } catch { Log 'ERROR' "unexpected error while handling a command: $_" }
    }
}

function Invoke-Timers {
    if ($Pending -and (Now) -ge $Pending.commit_at) { Invoke-Commit }
    $t = $Clock.Elapsed.TotalSeconds
    if ($Subscriber) {
        if ($null -cne $ProbeSentAt -and $t - $ProbeSentAt -ge $ProbeInterval) { Set-Lost 'no echo of its status'; Send-Probe }
        elseif ($null -ceq $ProbeSentAt -and $t - $LastHeard -ge $ProbeInterval) { Send-Probe }
    }
    if ($FailsafeAfter -gt 0 -and -not $FailsafeFired -and $OnBattery -and $null -cne $DisconnectedSince -and
        $t - $DisconnectedSince -ge $FailsafeAfter) { Invoke-Failsafe }
}

# -- main ------------------------------------------------------------------------------------------
if (-not $Key) { Log 'WARNING' 'COMMAND_SIGNING_KEY is not set: commands are not authenticated; set the same key as the policy worker' }
Log 'INFO' "agent $AgentId starting (dry run: $DryRun, tls: $Tls, broker ${MqttHost}:$MqttPort)"
Restore-State
Write-ClientConfig
$subValues = [ordered]@{ client_id = $ClientId; session_expiry = $SessionExpiry; prefix = $Prefix }
$subArgs = @($SubscriberArgs | ForEach-Object { Expand-Template $_ $subValues })
$Subscriber = $null
$NextStart = 0.0
$Backoff = 1
try {
    while ($true) {
        if (-not $Subscriber -and $Clock.Elapsed.TotalSeconds -ge $NextStart) {
            # Announce "offline" (true: nothing is subscribed yet); its echo brings "online".
            Send-Probe
            $Subscriber = New-ClientProcess $MosquittoSub $subArgs
            Set-Content -LiteralPath $SubscriberPidFile -Value $Subscriber.Id
            $SubscriberErr = $Subscriber.StandardError.ReadToEndAsync()
            $Reading = $Subscriber.StandardOutput.ReadLineAsync()
        }
        if ($Subscriber) {
            if ($Reading.Wait(200)) {
                $line = $Reading.Result
                if ($null -cne $line) {
                    Receive-Line $line
                    if ($Connected) { $Backoff = 1 }
                    $Reading = $Subscriber.StandardOutput.ReadLineAsync()
                } else {
                    $Subscriber.WaitForExit()
                    Log 'ERROR' "mosquitto_sub exited $($Subscriber.ExitCode): $($SubscriberErr.Result.Trim()); restarting in $Backoff s"
                    Set-Lost 'mosquitto_sub exited'
                    $Subscriber = $null
                    $NextStart = $Clock.Elapsed.TotalSeconds + $Backoff
                    $Backoff = [Math]::Min(2 * $Backoff, 60)
                }
            }
        } else { Start-Sleep -Milliseconds 200 }
        Invoke-Timers
    }
} finally {
    if ($Subscriber -and -not $Subscriber.HasExited) { $Subscriber.Kill() }
    [void](Publish "$Prefix/status" (Get-StatusJson 'offline') -Retain)
    Log 'INFO' 'stopping'
}
