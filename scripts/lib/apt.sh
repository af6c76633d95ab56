# Shared apt helpers for the setup scripts (sourced, not run).

# Print "URI<TAB>SUITE<TAB>COMPONENTS<TAB>SIGNED-BY" for every enabled binary ("deb") source of the system.
apt_entries() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '
      { sub(/#.*/, "") }
      $1 == "deb" {
        i = 2; opts = ""
        if ($i ~ /^\[/) { while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break }; i++ } }
        uri = $i; suite = $(i + 1); comps = ""
        for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
        key = ""
        if (match(opts, /signed-by=[^] ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
        if (uri != "" && suite != "") print uri "\t" suite "\t" comps "\t" key
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      function flush(   n, m, a, b, x, y) {
        if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
          n = split(uris, a, " "); m = split(suites, b, " ")
          for (x = 1; x <= n; x++) for (y = 1; y <= m; y++) print a[x] "\t" b[y] "\t" comps "\t" key
        }
        types = uris = suites = comps = key = last = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      /^#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ {
        v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
        if (last == "uris") uris = uris " " v; else if (last == "suites") suites = suites " " v
        else if (last == "components") comps = comps " " v
        next
      }
      {
        k = tolower(substr($0, 1, index($0, ":") - 1)); v = substr($0, index($0, ":") + 1)
        gsub(/^[ \t]+|[ \t]+$/, "", v); last = k
        if (k == "types") types = v; else if (k == "uris") uris = v; else if (k == "suites") suites = v
        else if (k == "components") comps = v; else if (k == "enabled") enabled = v
        else if (k == "signed-by" && v ~ /^\//) key = v
      }
      END { flush() }' "$f"
  done
}
