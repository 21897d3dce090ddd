#!/usr/bin/env bash
# Fetch the chat page's browser libraries from the npm registry at the pinned versions below, check
# every tarball against the sha512 integrity pinned here (the `dist.integrity` npm publishes), and copy
# their built browser files and licences into pipx_llama/server/static/vendor/, replacing what is there.
# Nothing is built or edited: the files are the packages' own. vendor/SHA256SUMS lists what was copied
# (the tests check the folder against it), vendor/README.md says where each file came from.
#
# Usage: scripts/vendor-web.sh            (needs npm and node; run it again to get the same bytes)
# To move to a new version: change its line in PACKAGES, run `npm view NAME@VERSION dist.integrity`
# for the new hash, run this script, and read the libraries' changelogs for anything the page uses.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/pipx_llama/server/static/vendor"

# name version integrity
PACKAGES=(
  "markdown-it 15.0.3 sha512-+Az7Ojz3iRGu8KYMvJ6xVhvrxP3eE+vEtJX75Ow88XBpcQNV/0lGX5ZynIIBftREo4DC2jsveAMDaeltmm8QvQ=="
  "markdown-it-texmath 1.0.0 sha512-4hhkiX8/gus+6e53PLCUmUrsa6ZWGgJW2XCW6O0ASvZUiezIK900ZicinTDtG3kAO2kon7oUA/ReWmpW2FByxg=="
  "dompurify 3.5.0 sha512-LYC0ZkE8P1V42JsRYTwMdme/2ET8SpOc5AA2eOFjP/IadvRd2fwiT4TVz5vkfy0XUx12aS2UaRkTnfVPNOv9vw=="
  "katex 0.19.1 sha512-jG8uKntjSEcm2EpQOh0XturpPuuC9r3Sq5HLHdsFdWZT27E672SF19QEi+of0/YeOy15lDgRhKvr5614uRrEfA=="
  "@highlightjs/cdn-assets 11.12.0 sha512-KvOKXODaiFmId9xaq3xc5xCL66wVLUuOngDbO9B/kewbFTqdGbn2nJxNhN3H5R1cgDTVj6R8vH0zgiNDEGjpDw=="
  # bundled inside markdown-it's browser build: fetched for their licences only
  "entities 8.1.0 sha512-kxL7msIffSuh9aaFAMD7rxAIuTRMAHMeBtgHW2yUdWw732ZNh4MehkF2gdjvtdmikkaIP9bFDDJOPlsvm7avrA=="
  "linkify-it 6.1.0 sha512-wJ/TwpSDTLepCrQoYWYIExIKg5Zchex2Nn5yk2mFnB+6PtdkHtyLx742md9csRjjOnGkKIS/RrbY7l8D6gT9Vw=="
  "mdurl 2.1.0 sha512-1+HBaOx0zi/dQWht8rNv9MYf9qqpqL/kxI0hXImU6Y547zM6Sni8BQibt7ifgMcYtQg41ao3Ivd6cnSM86inpg=="
  "punycode.js 2.3.1 sha512-uxFIHU0YlHYhDQtV4R9J6a52SLx28BCjT+4ieh7IGbgwVJWO+km431c4yRlREUAsAmt/uMjQUyQHNEPf0M39CA=="
  "uc.micro 3.0.0 sha512-U3PppEkleoTnIfi8BozMx3yju3qc/L6SwqWo2Sw+54PX+PX0q9I+r1Um5HCmqD7n9VDX5/v3vQH/AjA6deDdtw=="
)

# package -> "path in the tarball:path under vendor/" (a trailing / copies a folder's *.woff2 files)
copies() {
  case "$1" in
    markdown-it) echo "dist/browser/markdown-it.umd.min.js:markdown-it/markdown-it.min.js LICENSE:markdown-it/LICENSE.txt" ;;
    markdown-it-texmath) echo "texmath.js:markdown-it-texmath/texmath.js license.txt:markdown-it-texmath/LICENSE.txt" ;;
    dompurify) echo "dist/purify.min.js:dompurify/purify.min.js LICENSE:dompurify/LICENSE.txt LICENSE-MPL:dompurify/LICENSE-MPL.txt" ;;
    katex) echo "dist/katex.min.js:katex/katex.min.js dist/katex.min.css:katex/katex.min.css dist/fonts/:katex/fonts/ LICENSE:katex/LICENSE.txt" ;;
    @highlightjs/cdn-assets) echo "highlight.min.js:highlight/highlight.min.js styles/github.min.css:highlight/github.min.css styles/github-dark.min.css:highlight/github-dark.min.css LICENSE:highlight/LICENSE.txt" ;;
    entities|linkify-it|mdurl) echo "LICENSE:markdown-it/bundled/$1.LICENSE.txt" ;;
    punycode.js) echo "LICENSE-MIT.txt:markdown-it/bundled/$1.LICENSE.txt" ;;
    uc.micro) echo "LICENSE.txt:markdown-it/bundled/$1.LICENSE.txt" ;;
    *) echo "no copy rule for $1" >&2; exit 1 ;;
  esac
}

command -v npm >/dev/null || { echo "npm is needed (it comes with Node.js)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$DEST.new"' EXIT  # a failed run leaves vendor/ as it was

# sha512 in npm's integrity notation, by node (no sha512sum/base64 flag differences across systems)
integrity() {
  node -e 'const c=require("crypto"),f=require("fs");
           process.stdout.write("sha512-"+c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$1"
}

rm -rf "$DEST.new"
mkdir -p "$DEST.new"
{
  echo "# Vendored browser libraries of the chat page"
  echo
  echo "Written by \`scripts/vendor-web.sh\`, which fetched each package below from the npm registry,"
  echo "checked its tarball against the pinned sha512 integrity and copied the files listed. Do not edit"
  echo "these files: change the pins in the script and run it again. \`SHA256SUMS\` lists every file."
  echo
  echo "| package | version | licence | tarball integrity |"
  echo "|---|---|---|---|"
} > "$DEST.new/README.md"

for line in "${PACKAGES[@]}"; do
  read -r name version want <<<"$line"
  echo "fetching $name@$version"
  (cd "$WORK" && npm pack --silent "$name@$version" >/dev/null)
  tarball="$WORK/$(echo "${name#@}" | tr / -)-$version.tgz"
  got=$(integrity "$tarball")
  if [ "$got" != "$want" ]; then
    echo "$name@$version: the tarball's integrity is $got, the script pins $want; not using it" >&2
    exit 1
  fi
  unpacked="$WORK/unpacked/$name"
  mkdir -p "$unpacked"
  tar -xzf "$tarball" -C "$unpacked"
  licence=$(node -e 'process.stdout.write(String(require(process.argv[1]).license || "?"))' "$unpacked/package/package.json")
  echo "| $name | $version | $licence | \`$want\` |" >> "$DEST.new/README.md"
  for pair in $(copies "$name"); do
    src="$unpacked/package/${pair%%:*}"
    dst="$DEST.new/${pair#*:}"
    mkdir -p "$(dirname "$dst")"
    if [[ "$src" == */ ]]; then
      mkdir -p "$dst"
      cp "$src"*.woff2 "$dst"
    else
      cp "$src" "$dst"
    fi
  done
done

{
  echo
  echo "markdown-it's browser build bundles entities, linkify-it, mdurl, punycode.js and uc.micro; their"
  echo "licences are in \`markdown-it/bundled/\`. KaTeX's fonts are its WOFF2 files only (every browser the"
  echo "page supports reads WOFF2, so the CSS never asks for the .woff or .ttf fallbacks)."
} >> "$DEST.new/README.md"

# a stable listing: sorted paths, LF line endings, the format `sha256sum -c` reads
(cd "$DEST.new" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort | while read -r f; do
  node -e 'const c=require("crypto"),f=require("fs");
           process.stdout.write(c.createHash("sha256").update(f.readFileSync(process.argv[1])).digest("hex"))' "$f"
  echo "  $f"
done) > "$DEST.new/SHA256SUMS"

# the page must stay within `script-src 'self'`: no library may compile code from strings
if grep -nE '(^|[^.$[:alnum:]_])(eval|Function)[[:space:]]*\(' -r --include='*.js' "$DEST.new"; then
  echo "a vendored script calls eval or Function (above): the page's CSP would block it" >&2
  exit 1
fi

rm -rf "$DEST"
mv "$DEST.new" "$DEST"
echo "vendored into ${DEST#"$ROOT"/}:"
du -sh "$DEST"
