"""MkDocs hook: publish the experiment logs of bench/ as pages of the site.

The guides link to `../bench/spam_experiments.md` and `../bench/alignment_experiments.md`, paths that work when the
repository is read as files (on GitHub, in an editor). Those logs live beside the benchmark scripts, outside
`docs/`, so MkDocs would not find them and `--strict` would fail on the links: this hook adds each
`bench/*_experiments.md` to the site as `experiments/<name>` and points the guides' links there.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

BENCH = Path(__file__).resolve().parents[2] / "bench"
PUBLISHED_AS = "experiments/"
LINK = re.compile(r"\]\(((?:\.\./)+)bench/([\w-]+_experiments\.md)")


def on_files(files, config):
    for log in sorted(BENCH.glob("*_experiments.md")):
        files.append(File.generated(config, PUBLISHED_AS + log.name, abs_src_path=str(log)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # how many ../ lead from this page to docs/

    def to_published(match):
        if len(match.group(1)) // 3 != depth + 1:  # not a link to the repository's bench/: leave it to MkDocs
            return match.group(0)
        return f"]({'../' * depth}{PUBLISHED_AS}{match.group(2)}"

    return LINK.sub(to_published, markdown)
