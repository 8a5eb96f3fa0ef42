<#
.SYNOPSIS
Windows host agent: acts once on a genuine shutdown/abort/test command and acks what it did.

.DESCRIPTION
PowerShell 5.1 with mosquitto_sub.exe / mosquitto_pub.exe (Mosquitto for Windows) and .NET's
HMACSHA256. The contract is docs/command-contract.md. Nothing from a payload is ever executed:
actions map to shutdown.exe /s /t <delay> and shutdown.exe /a; the only payload values that
reach a command line are validated integers. Not run by the test suite (no PowerShell there).
#>
param([string]$EnvFile = "$env:ProgramData\EcoflowAgent\agent.env")

$ErrorActionPreference = 'Stop'
$Version = '1.0.0'
$SafeText = '^[\x20\x21\x23-\x5b\x5d-\x7e]*$'   # printable ASCII without '"' and '\'

function Log($Level, $Text) {
    $line = "{0} {1} ecoflow-agent: {2}" -f (Get-Date).ToUniversalTime().ToString('s'), $Level, $Text
    Add-Content -Path $Global:LogFile -Value $line
    Write-Host $line
}

# KEY=VALUE lines, never evaluated; the process environment wins.
$Settings = @{}
if (Test-Path $EnvFile) {
    foreach ($raw in Get-Content $EnvFile) {
        $line = $raw.Trim()
        if (-not $line -or $line.StartsWith('#')) { continue }
        $key, $value = $line -split '=', 2
        $value = $value.Trim().Trim('"').Trim("'")
        $Settings[$key.Trim()] = $value
    }
}
function Setting($Name, $Default = '') {
    $fromEnv = [Environment]::GetEnvironmentVariable($Name)
    if ($fromEnv) { return $fromEnv }
    if ($Settings.ContainsKey($Name) -and $Settings[$Name]) { return $Settings[$Name] }
    return $Default
}

$AgentId = Setting 'AGENT_ID'
if ($AgentId -notmatch '^[A-Za-z0-9._-]{1,64}$') { throw "AGENT_ID is empty or invalid: set it to this host's name in the policy topology" }
$StateDir = Setting 'STATE_DIR' "$env:ProgramData\EcoflowAgent"
New-Item -ItemType Directory -Force -Path $StateDir | Out-Null
$Global:LogFile = Join-Path $StateDir 'agent.log'
$TlsCa = Setting 'MQTT_TLS_CA'
$Tls = [bool]$TlsCa -or ((Setting 'MQTT_TLS') -match '^(1|true|yes|on)$')
$MqttHost = Setting 'MQTT_HOST' 'localhost'
$MqttPort = [int](Setting 'MQTT_PORT' $(if ($Tls) { '8883' } else { '1883' }))
$MqttUser = Setting 'MQTT_USER' $AgentId
$MqttPass = Setting 'MQTT_PASS'
$SessionExpiry = [int](Setting 'MQTT_SESSION_EXPIRY_SEC' '3600')
$Key = Setting 'COMMAND_SIGNING_KEY'
$Skew = [int](Setting 'CLOCK_SKEW_SEC' '60')
$DryRun = (Setting 'DRY_RUN') -match '^(1|true|yes|on)$'
$DryRunLog = Setting 'DRY_RUN_LOG' (Join-Path $StateDir 'dry-run.jsonl')
$PreTimeout = [int](Setting 'PRE_SHUTDOWN_TIMEOUT_SEC' '60')
$PreCommands = @(1..9 | ForEach-Object { Setting "PRE_SHUTDOWN_CMD_$_" } | Where-Object { $_ })
$Prefix = "power-manager/$AgentId"
$ClientId = "ecoflow-agent-$AgentId"
$Executed = Join-Path $StateDir 'executed-ids.txt'
$PendingFile = Join-Path $StateDir 'pending.json'
$Committed = Join-Path $StateDir 'committed-ids.txt'

# Client options in files read from XDG_CONFIG_HOME, so the password is not on a command line.
$ClientConfig = Join-Path $StateDir 'mqtt-client'
New-Item -ItemType Directory -Force -Path $ClientConfig | Out-Null
$opts = @("-h $MqttHost", "-p $MqttPort", "-u $MqttUser", '-V mqttv5')
if ($MqttPass) { $opts += "-P $MqttPass" }
if ($Tls) { if ($TlsCa) { $opts += "--cafile $TlsCa" } else { $opts += '--tls-use-os-certs' } }
foreach ($name in 'mosquitto_sub', 'mosquitto_pub') { Set-Content -Path (Join-Path $ClientConfig $name) -Value $opts -Encoding ascii }
$env:XDG_CONFIG_HOME = $ClientConfig

function Get-Canonical($C) {
    # docs/command-contract.md, "Canonical form": these lines joined with "`n".
    return (@('ecoflow-cmd-v1', $C.agent, $C.id, $C.action, $C.delay_sec, $C.ttl_sec,
              $C.issued_at, $C.episode_id, $C.cancels, $C.reason) | ForEach-Object { [string]$_ }) -join "`n"
}

function Get-Signature($SigningKey, $Text) {
    $hmac = New-Object System.Security.Cryptography.HMACSHA256 (,[Text.Encoding]::UTF8.GetBytes($SigningKey))
    try { $hash = $hmac.ComputeHash([Text.Encoding]::UTF8.GetBytes($Text)) } finally { $hmac.Dispose() }
    return -join ($hash | ForEach-Object { $_.ToString('x2') })
}

function Publish($Topic, $Payload, [switch]$Retain) {
    $pubArgs = @('-q', '1', '-t', $Topic, '-s')
    if ($Retain) { $pubArgs += '-r' }
    # -s reads the payload from stdin: no quoting rules of the Windows command line apply.
    $Payload | & mosquitto_pub.exe @pubArgs
    if ($LASTEXITCODE -ne 0) { Log 'ERROR' "could not publish to $Topic" }
}

function Status($State) {
    ConvertTo-Json -Compress @{ state = $State; agent = $AgentId; version = $Version; platform = 'windows';
        host = $env:COMPUTERNAME; ts = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds(); dry_run = [bool]$DryRun }
}

function Ack($Id, $Status, $Detail) {
    Publish "$Prefix/ack" (ConvertTo-Json -Compress @{ id = $Id; agent = $AgentId; status = $Status;
        host = $env:COMPUTERNAME; ts = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds(); detail = $Detail })
}

function Run-Step($Step, $CommandId, [string]$File, [string[]]$Arguments, $TimeoutSec) {
    if ($DryRun) {
        Add-Content -Path $DryRunLog -Value (ConvertTo-Json -Compress @{ ts = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds();
            agent = $AgentId; command_id = $CommandId; step = $Step; argv = @($File) + $Arguments })
        Log 'INFO' "dry run: $Step for $CommandId would run $File $Arguments"
        return $null
    }
    Log 'INFO' "$Step for ${CommandId}: running $File $Arguments"
    $p = Start-Process -FilePath $File -ArgumentList $Arguments -NoNewWindow -PassThru
    if (-not $p.WaitForExit($TimeoutSec * 1000)) { $p.Kill(); return "$File timed out after $TimeoutSec s" }
    if ($p.ExitCode -ne 0) { return "$File exited $($p.ExitCode)" }
    return $null
}

function Get-HaltDelay($DelaySec) { return $DelaySec + $PreTimeout * $PreCommands.Count }

function Commit($Id) {
    Add-Content -Path $Committed -Value $Id
    Remove-Item -Force -ErrorAction SilentlyContinue $PendingFile
    Log 'INFO' "shutdown $Id reached its commit point: no abort from now on"
    $failures = @()
    for ($n = 0; $n -lt $PreCommands.Count; $n++) {
        # A pre-shutdown command is a local setting, run by cmd.exe as written by the administrator.
        $err = Run-Step "pre_shutdown_$($n + 1)" $Id 'cmd.exe' @('/c', $PreCommands[$n]) $PreTimeout
        if ($err) { $failures += "PRE_SHUTDOWN_CMD_$($n + 1): $err" }
    }
    $detail = if ($failures) { $failures -join '; ' } else { "$($PreCommands.Count) ok" }
    Ack $Id $(if ($DryRun) { 'dry_run' } else { 'executing' }) "commit point reached; pre-shutdown: $detail"
}

function Handle-Command([string]$Payload, [bool]$Retained) {
    try { $C = ConvertFrom-Json $Payload } catch { Ack '' 'rejected' 'malformed: not JSON'; return }
    $id = if ($C.id -is [string] -and $C.id -match $SafeText) { $C.id } else { '' }
    foreach ($f in 'episode_id', 'cancels', 'reason') { if ($null -eq $C.$f) { $C | Add-Member -Force $f '' } }
    foreach ($f in 'id', 'agent', 'action', 'episode_id', 'cancels', 'reason') {
        if (-not ($C.$f -is [string]) -or $C.$f -notmatch $SafeText -or $C.$f.Length -gt 200) { Ack $id 'rejected' "malformed: $f"; return }
    }
    foreach ($f in 'v', 'delay_sec', 'ttl_sec', 'issued_at') {
        if (-not ($C.$f -is [int] -or $C.$f -is [long])) { Ack $id 'rejected' "malformed: $f missing or not an integer"; return }
    }
    if (-not $id -or $C.v -ne 1 -or $C.action -notin 'shutdown', 'abort', 'test' -or $C.delay_sec -lt 0 -or
        $C.delay_sec -gt 86400 -or $C.ttl_sec -lt 1 -or $C.ttl_sec -gt 86400) { Ack $id 'rejected' 'malformed'; return }
    $where = "command $id ($($C.action), episode $($C.episode_id))"
    if ($Retained) { Log 'WARNING' "$where rejected: retained"; Ack $id 'rejected' 'retained'; return }
    if ($C.agent -ne $AgentId) { Log 'WARNING' "$where rejected: addressed to $($C.agent)"; Ack $id 'rejected' 'wrong agent'; return }
    if ($Key) {
        if (-not $C.sig) { Log 'WARNING' "$where rejected: missing signature"; Ack $id 'rejected' 'missing signature'; return }
        if ((Get-Signature $Key (Get-Canonical $C)) -ne ([string]$C.sig).ToLower()) {
            Log 'WARNING' "$where rejected: bad signature"; Ack $id 'rejected' 'bad signature'; return
        }
    }
    $now = [DateTimeOffset]::UtcNow.ToUnixTimeSeconds()
    if ($now -gt $C.issued_at + $C.ttl_sec + $Skew) { Log 'WARNING' "$where expired"; Ack $id 'expired' 'expired'; return }
    if ($C.issued_at -gt $now + $Skew) { Log 'WARNING' "$where rejected: issued in the future"; Ack $id 'rejected' 'issued in the future (check the clocks)'; return }
    if ((Test-Path $Executed) -and ((Get-Content $Executed) -contains $id)) {
        Log 'INFO' "$where ignored: already handled (redelivery)"; Ack $id 'rejected' 'duplicate'; return
    }
    $pending = if (Test-Path $PendingFile) { Get-Content $PendingFile -Raw | ConvertFrom-Json } else { $null }
    switch ($C.action) {
        'abort' {
            $target = $C.cancels
            if (((Test-Path $Committed) -and ((Get-Content $Committed) -contains $target)) -or
                ($pending -and $pending.id -eq $target -and $now -ge $pending.commit_at)) {
                Log 'WARNING' "$where refused: past the commit point"; Ack $id 'rejected' 'abort after commit point'; return
            }
            if (-not $pending -or $pending.id -ne $target) { Ack $id 'rejected' "no pending shutdown '$target'"; return }
            Remember $id
            Remove-Item -Force $PendingFile
            $err = Run-Step 'abort' $id 'shutdown.exe' @('/a') 60
            if ($err) { Ack $id 'rejected' "ABORT_CMD failed: $err" } else { Log 'INFO' "$where aborted $target"; Ack $id 'aborted' "cancelled $target" }
        }
        'test' {
            Remember $id
            Ack $id 'received' "test ok: would run shutdown.exe /s /t $(Get-HaltDelay 0)"
        }
        'shutdown' {
            if ($pending) { Ack $id 'rejected' "shutdown $($pending.id) already pending"; return }
            Remember $id
            $halt = Get-HaltDelay $C.delay_sec
            # The OS timer is set first, so the host halts even if this agent dies in the window.
            $err = Run-Step 'shutdown' $id 'shutdown.exe' @('/s', '/t', "$halt", '/d', 'u:6:12', '/c', "EcoFlow agent: shutdown $id") 60
            if ($err) { Ack $id 'rejected' "SHUTDOWN_CMD failed: $err"; return }
            Set-Content -Path $PendingFile -Value (ConvertTo-Json -Compress @{ id = $id; commit_at = $now + $C.delay_sec })
            Log 'INFO' "$where accepted: $($C.reason)"
            Ack $id $(if ($DryRun) { 'dry_run' } else { 'scheduled' }) "shutdown in $($C.delay_sec) s; abort possible until $($now + $C.delay_sec)"
        }
    }
}

function Remember($Id) {
    # Written through to disk before acting, so a restart cannot act on the same id twice.
    $stream = [IO.File]::Open($Executed, 'Append', 'Write')
    try { $bytes = [Text.Encoding]::ASCII.GetBytes("$Id`r`n"); $stream.Write($bytes, 0, $bytes.Length); $stream.Flush($true) } finally { $stream.Close() }
}

if (-not $Key) { Log 'WARNING' 'COMMAND_SIGNING_KEY is not set: commands are not authenticated' }
Log 'INFO' "agent $AgentId starting (dry run: $DryRun, tls: $Tls, broker ${MqttHost}:$MqttPort)"
$subArgs = @('-c', '-i', $ClientId, '-x', "$SessionExpiry", '-k', '30', '-q', '1', '--retain-as-published',
             '-t', "$Prefix/cmd", '-t', "$Prefix/status", '-F', 'MSG %t %r %x', '-W', '5',
             '--will-topic', "$Prefix/status", '--will-qos', '1', '--will-retain', '--will-payload', (Status 'offline'))
Publish "$Prefix/status" (Status 'offline') -Retain
while ($true) {
    # -W 5 ends mosquitto_sub after five quiet seconds, so the commit point is checked between
    # runs; the persistent session keeps everything sent in between.
    $lines = & mosquitto_sub.exe @subArgs 2>&1
    foreach ($line in $lines) {
        if ("$line" -notmatch '^MSG (\S+) (\d) ([0-9a-f]+)$') { continue }
        $topic, $retainFlag, $hex = $Matches[1], $Matches[2], $Matches[3]
        $bytes = [byte[]]@(for ($i = 0; $i -lt $hex.Length; $i += 2) { [Convert]::ToByte($hex.Substring($i, 2), 16) })
        $text = [Text.Encoding]::UTF8.GetString($bytes)
        if ($topic -eq "$Prefix/status") {
            if ($text -match '"state":\s*"offline"') { Publish "$Prefix/status" (Status 'online') -Retain }
        } else {
            try { Handle-Command $text ($retainFlag -eq '1') } catch { Log 'ERROR' "error while handling a command: $_" }
        }
    }
    if (Test-Path $PendingFile) {
        $pending = Get-Content $PendingFile -Raw | ConvertFrom-Json
        if ([DateTimeOffset]::UtcNow.ToUnixTimeSeconds() -ge $pending.commit_at) { Commit $pending.id }
    }
}
