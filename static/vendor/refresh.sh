#!/bin/sh
# Re-download the page's pinned Markdown renderer and sanitizer from the npm registry.
# Run from anywhere; writes beside this script. Bump a version here, run it, test the page.
#
#   markdown-it  Markdown -> HTML (its browser build bundles entities, linkify-it, mdurl,
#                punycode.js and uc.micro, whose licenses go to markdown-it.BUNDLED-LICENSES)
#   DOMPurify    HTML sanitizer (Apache-2.0 or MPL-2.0, both texts kept)
set -eu

MARKDOWN_IT=15.0.3
DOMPURIFY=3.5.0
# The dependencies markdown-it's browser build bundles, at the ranges its package.json asks for.
BUNDLED="entities@^8.1.0 linkify-it@^6.1.0 mdurl@^2.1.0 punycode.js@^2.3.1 uc.micro@^3.0.0"

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

unpack() {  # npm pack NAME@VERSION (integrity-checked by npm), then extract into ./NAME
    tarball=$(npm pack --silent "$1" | tail -n 1)
    mkdir -p "$2"
    tar -xzf "$tarball" -C "$2" --strip-components=1
}

unpack "markdown-it@$MARKDOWN_IT" markdown-it
cp markdown-it/dist/browser/markdown-it.umd.min.js "$here/markdown-it.min.js"
cp markdown-it/LICENSE "$here/markdown-it.LICENSE"

unpack "dompurify@$DOMPURIFY" dompurify
cp dompurify/dist/purify.min.js "$here/purify.min.js"
cp dompurify/LICENSE "$here/dompurify.LICENSE"
cp dompurify/LICENSE-MPL "$here/dompurify.LICENSE-MPL"

out="$here/markdown-it.BUNDLED-LICENSES"
echo "Licenses of the packages bundled into markdown-it $MARKDOWN_IT's browser build." > "$out"
for spec in $BUNDLED; do
    name=${spec%@*}
    unpack "$spec" "dep-$name"
    version=$(node -p "require('./dep-$name/package.json').version")
    printf '\n==== %s %s ====\n\n' "$name" "$version" >> "$out"
    cat "dep-$name"/LICENSE* >> "$out"
done

echo "markdown-it $MARKDOWN_IT and DOMPurify $DOMPURIFY are in $here"
