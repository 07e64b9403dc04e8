#!/usr/bin/env bash
# Prints the URI of the Debian mirror this machine already uses for the bookworm suite, read
# from its apt sources (deb822 .sources files and one-line .list files), or fails.
#   bash scripts/apt-mirror.sh [SOURCES_DIR_ROOT]   # default /etc/apt
set -euo pipefail
root=${1:-/etc/apt}
files=()
[ -f "$root/sources.list" ] && files+=("$root/sources.list")
for f in "$root"/sources.list.d/*.sources "$root"/sources.list.d/*.list; do
  [ -f "$f" ] && files+=("$f")
done
[ "${#files[@]}" -gt 0 ] || exit 1
for f in "${files[@]}"; do
  case "$f" in
    *.sources)
      # deb822 stanzas: the first stanza of Types deb whose Suites name bookworm.
      awk '
        function flush() { if (deb && suite && uri != "") { print uri; found = 1; exit } deb = suite = 0; uri = "" }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]*#/ { next }
        tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
        tolower($1) == "uris:" { uri = $2 }
        tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
        tolower($1) == "enabled:" && tolower($2) == "no" { deb = 0 }
        END { if (!found) flush() }
      ' "$f"
      ;;
    *.list)
      # One-line form: deb [options] URI SUITE COMPONENTS...
      awk '
        $1 == "deb" {
          i = 2
          if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) == "bookworm") { print $i; exit }
        }
      ' "$f"
      ;;
  esac
done | head -n 1 | grep . || exit 1
