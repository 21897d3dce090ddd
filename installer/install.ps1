<#
.SYNOPSIS
    pipx-llama bootstrap for Windows: makes sure pipx is there (installing it for this user if not --
    no administrator rights needed), then runs `pipx run pipx-llama ARGS...`.

.DESCRIPTION
    powershell -ExecutionPolicy Bypass -File install.ps1          chat with the default small model
    powershell -ExecutionPolicy Bypass -File install.ps1 7B       chat with Llama-2-7B-Chat

    How pipx is found, in order: `pipx` on PATH; `PYTHON -m pipx`; `PYTHON -m pip install --user pipx`;
    and where pip refuses user installs (a virtual environment), a private virtual environment with pipx
    in it, under %LOCALAPPDATA%\pipx-llama\bootstrap.

    Environment: PYTHON (the Python 3.10+ to use; default: `py -3`, then python3, then python),
    PIPX_LLAMA_SPEC (what pipx runs; default: pipx-llama -- e.g. a version pin or a wheel file), and
    pipx's own variables (PIPX_HOME, PIPX_BIN_DIR, ...).
    Exit codes: pipx-llama's own; 1 when no suitable Python or pipx could be found or installed.
#>

$ErrorActionPreference = 'Stop'
$forwarded = $args

function Say([string]$Text) {
    [Console]::Error.WriteLine("pipx-llama installer: $Text")
}

function Fail([string]$Message, [string]$Hint) {
    [Console]::Error.WriteLine("error: $Message")
    if ($Hint) { [Console]::Error.WriteLine("hint: $Hint") }
    exit 1
}

# Runs a command given as an array (program, then arguments); returns its exit code, output discarded.
function Test-Command([string[]]$Command) {
    try {
        $program, $rest = $Command
        & $program @rest *> $null
        return $LASTEXITCODE
    } catch {
        return 1
    }
}

# A Python 3.10 or newer, as a command array: $env:PYTHON, `py -3`, python3, python. The Microsoft Store's
# python.exe stub fails the version check, so it is skipped.
function Find-Python {
    $candidates = @()
    if ($env:PYTHON) { $candidates += , @($env:PYTHON) }
    $candidates += , @('py', '-3')
    $candidates += , @('python3')
    $candidates += , @('python')
    foreach ($candidate in $candidates) {
        if (-not (Get-Command $candidate[0] -ErrorAction SilentlyContinue)) { continue }
        $check = $candidate + @('-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)')
        if ((Test-Command $check) -eq 0) { return , $candidate }
    }
    return $null
}

$python = Find-Python
$bootstrap = Join-Path $env:LOCALAPPDATA 'pipx-llama\bootstrap'
$bootstrapPipx = Join-Path $bootstrap 'Scripts\pipx.exe'
$pipx = $null  # a command array

if (Get-Command pipx -ErrorAction SilentlyContinue) {
    $pipx = @('pipx')
} elseif (Test-Path $bootstrapPipx) {
    $pipx = @($bootstrapPipx)
} elseif ($python -and (Test-Command ($python + @('-m', 'pipx', '--version'))) -eq 0) {
    $pipx = $python + @('-m', 'pipx')
}

if (-not $pipx) {
    if (-not $python) {
        Fail 'pipx is not installed and there is no Python 3.10 or newer to install it with' `
            'install Python 3.10+ from python.org (tick "Add python.exe to PATH"), or pipx itself, then run this again'
    }
    $pyProgram, $pyArgs = $python
    $inVenv = (Test-Command ($python + @('-c', 'import sys; sys.exit(1 if sys.prefix != sys.base_prefix else 0)'))) -ne 0
    if (-not $inVenv) {
        Say "pipx is not installed; installing it for this user: $($python -join ' ') -m pip install --user pipx"
        & $pyProgram @pyArgs -m pip install --user --quiet pipx
        if ($LASTEXITCODE -eq 0 -and (Test-Command ($python + @('-m', 'pipx', '--version'))) -eq 0) {
            $pipx = $python + @('-m', 'pipx')
        }
    }
    if (-not $pipx) {
        Say "installing pipx in a virtual environment of its own: $bootstrap"
        if (Test-Path $bootstrap) { Remove-Item -Recurse -Force $bootstrap }
        & $pyProgram @pyArgs -m venv $bootstrap
        if ($LASTEXITCODE -eq 0) {
            & (Join-Path $bootstrap 'Scripts\python.exe') -m pip install --quiet --disable-pip-version-check pipx
        }
        if ($LASTEXITCODE -ne 0 -or -not (Test-Path $bootstrapPipx)) {
            if (Test-Path $bootstrap) { Remove-Item -Recurse -Force $bootstrap }
            Fail "could not install pipx with $($python -join ' ')" `
                'install pipx yourself (https://pipx.pypa.io: scoop install pipx, or py -m pip install --user pipx), then run this again'
        }
        $pipx = @($bootstrapPipx)
    }
}

$spec = if ($env:PIPX_LLAMA_SPEC) { $env:PIPX_LLAMA_SPEC } else { 'pipx-llama' }
$pipxProgram, $pipxArgs = $pipx
& $pipxProgram @pipxArgs run --spec $spec pipx-llama @forwarded
exit $LASTEXITCODE
