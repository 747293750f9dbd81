"""README.md stays a front page (at most 250 lines, the newcomer's order) and every relative link in it and
in docs/ leads to a file, and to a heading where it names one."""

import re

from ts_launcher import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a # in a code block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


def links(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"^## (.*)$", text, re.M)
    assert headings == ["Two commands", "Calling it", "Serving your own checkpoint", "Read more"]
    commands = re.search(r"```bash\n(.*?)```", text, re.S)[1]  # the first code block: the two commands
    assert [line.split()[:2] for line in commands.splitlines()] == [["make", "serve"], ["make", "test"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_docs_page_is_on_the_readmes_map_and_opens_with_what_it_answers():
    mapped = {ROOT / link for link in links(ROOT / "README.md") if link.startswith("docs/")}
    for page in PAGES[1:]:
        assert page in mapped, page.name
        first = page.read_text().split("\n\n")[1]
        assert first.startswith("What this answers:"), page.name


def test_every_relative_link_leads_somewhere():
    broken = []
    for page in PAGES:
        for link in links(page):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and anchor not in anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken
