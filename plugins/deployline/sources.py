"""Git as the source of commits: any git URL, credentials from an Airflow connection.

The branch head comes from ``git ls-remote`` (no clone).  History questions (changed
paths, commits between two shas, revision numbers) are answered from a bare mirror
kept in the work directory and refreshed with ``git fetch``.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from deployline.commands import tool_environment
from deployline.workdirs import work_dir

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SHA = re.compile(r"^[0-9a-f]{4,40}$")
_FIELD_SEP = "\x1f"
_REVERTS = re.compile(r"This reverts commit ([0-9a-f]{7,40})")
# What git (and the usual servers) print when the credentials are missing or wrong.
_AUTH_FAILED = re.compile(
    r"Authentication failed|could not read (Username|Password)|HTTP Basic: Access denied"
    r"|The requested URL returned error: 40[13]|Permission denied \(publickey",
    re.IGNORECASE,
)


class GitError(RuntimeError):
    """A git operation failed; the message names the (redacted) repository URL."""


class UnknownCommit(GitError):
    """The commit asked for does not exist in the repository (or is no sha): asking again cannot help."""


def redact(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:token@host`` -> ``https://***@host``)."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


@dataclass(frozen=True)
class Commit:
    sha: str
    author: str
    email: str
    committed_at: str  # ISO 8601 with offset
    message: str  # subject line
    reverts: tuple[str, ...] = ()  # shas named by `git revert`'s "This reverts commit <sha>."

    @property
    def short(self) -> str:
        return self.sha[:10]

    def to_dict(self) -> dict:
        return asdict(self) | {"short": self.short, "reverts": list(self.reverts)}


class GitSource:
    def __init__(
        self,
        url: str,
        branch: str = "main",
        username: str | None = None,
        password: str | None = None,
        timeout: int = 120,
    ):
        self.url = url
        self.branch = branch
        self.timeout = timeout
        self.conn_id: str | None = None  # the Airflow connection the credentials came from, if any
        self._secrets = [s for s in (password,) if s]
        self._auth_env = {}
        if password:
            token = base64.b64encode(f"{username or 'git'}:{password}".encode()).decode()
            self._secrets.append(token)
            # Passed through the environment, never on the command line or in the URL.
            self._auth_env = {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}",
            }

    @classmethod
    def connect(cls, url: str, branch: str, conn_id: str | None = None) -> GitSource:
        """A source whose credentials (login, password or token) come from an Airflow connection."""
        username = password = None
        if conn_id:
            from airflow.sdk import BaseHook

            conn = BaseHook.get_connection(conn_id)
            username, password = conn.login, conn.password
        source = cls(url, branch, username, password)
        source.conn_id = conn_id
        return source

    @classmethod
    def from_repository(cls, repository) -> GitSource:
        return cls.connect(repository.url, repository.branch, repository.conn_id)

    @property
    def display_url(self) -> str:
        return redact(self.url)

    # -- running git -------------------------------------------------------------------
    def _clean(self, text: str) -> str:
        text = redact(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _git(self, *args: str, cwd: Path | None = None, timeout: int | None = None) -> str:
        # GIT_TRACE*: git's own tracing (the polling benchmark counts git processes with it).
        env = tool_environment(self._auth_env | {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"},
                               prefixes=("GIT_TRACE",))
        try:
            done = subprocess.run(
                ["git", *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise GitError(
                f"git {args[0]} timed out after {exc.timeout:.0f}s for repository {self.display_url}"
            ) from None
        except FileNotFoundError:
            raise GitError("git is not installed (no 'git' on PATH)") from None
        if done.returncode != 0:
            detail = self._clean(done.stderr.strip() or done.stdout.strip())[-2000:]
            if _AUTH_FAILED.search(detail):
                detail += f"\n{self._credentials_hint()}"
            raise GitError(f"git {args[0]} failed for repository {self.display_url}: {detail}")
        return done.stdout

    def _credentials_hint(self) -> str:
        if self.conn_id:
            return (f"the repository refused the credentials of Airflow connection {self.conn_id!r} "
                    "(repository.conn_id): check its login and password or token")
        if self._auth_env:
            return "the repository refused the credentials given: check the login and password or token"
        if _USERINFO.search(self.url):
            return "the repository refused the credentials in its URL (repository.url): check them"
        return ("the repository needs credentials: set repository.conn_id to an Airflow connection "
                "with a login and a password or token")

    # -- remote questions (no clone) -------------------------------------------------------
    def head(self) -> str:
        """The sha at the tip of the branch, by one ref listing."""
        out = self._git("ls-remote", "--heads", "--", self.url, f"refs/heads/{self.branch}")
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            if ref == f"refs/heads/{self.branch}":
                return sha
        raise GitError(f"branch {self.branch!r} not found in repository {self.display_url}")

    # -- history, from a local mirror ---------------------------------------------------
    @property
    def mirror_path(self) -> Path:
        key = hashlib.sha256(redact(self.url).encode()).hexdigest()[:16]
        return work_dir() / "git-mirrors" / f"{key}.git"

    @contextmanager
    def _locked_mirror(self):
        path = self.mirror_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            # Tasks of several runs share a mirror: one fetch at a time.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "HEAD").exists():
                shutil.rmtree(path, ignore_errors=True)
                self._git("init", "--quiet", "--bare", str(path))
            yield path

    def fetch(self, sha: str | None = None) -> Path:
        """Bring the branch (and ``sha`` when given) into the mirror; returns the mirror path."""
        with self._locked_mirror() as mirror:
            if sha and self._has_commit(mirror, sha):
                return mirror
            self._git(
                "fetch", "--quiet", "--prune", "--no-tags", "--", self.url,
                f"+refs/heads/{self.branch}:refs/heads/{self.branch}",
                cwd=mirror,
            )
            if sha and not self._has_commit(mirror, sha):
                try:
                    self._git("fetch", "--quiet", "--no-tags", "--", self.url, sha, cwd=mirror)
                except GitError:
                    pass
                if not self._has_commit(mirror, sha):
                    raise UnknownCommit(f"commit {sha!r} not found in repository {self.display_url}")
        return mirror

    def _has_commit(self, mirror: Path, ref: str) -> bool:
        try:
            self._git("cat-file", "-e", f"{ref}^{{commit}}", cwd=mirror)
            return True
        except GitError:
            return False

    def resolve(self, ref: str) -> Commit:
        """Full commit details for a sha (or short sha) after fetching it."""
        ref = ref.strip()
        if not _SHA.match(ref):
            raise UnknownCommit(f"not a commit sha: {ref!r} (expected 4-40 hex characters)")
        mirror = self.fetch(ref)
        return self._log(mirror, "-1", ref)[0]

    def _log(self, mirror: Path, *args: str) -> list[Commit]:
        fmt = _FIELD_SEP.join(["%H", "%an", "%ae", "%cI", "%s", "%b"]) + "\x1e"
        out = self._git("log", f"--format={fmt}", *args, "--", cwd=mirror)
        commits = []
        for record in out.split("\x1e"):
            record = record.strip("\n")
            if record:
                *fields, body = record.split(_FIELD_SEP, 5)
                commits.append(Commit(*fields, reverts=tuple(_REVERTS.findall(body))))
        return commits

    def commits_between(self, old: str | None, new: str) -> list[Commit]:
        """Commits in ``new`` and not in ``old``, newest first (all of ``new``'s history if no ``old``)."""
        mirror = self.fetch(new)
        return self._log(mirror, f"{old}..{new}" if old else new)

    def changed_paths(self, old: str | None, new: str) -> list[str]:
        """Paths that differ between two commits (every path of ``new`` when there is no ``old``)."""
        mirror = self.fetch(new)
        if old is None:
            out = self._git("ls-tree", "-r", "--name-only", new, cwd=mirror)
        else:
            out = self._git("diff", "--name-only", "--no-renames", old, new, cwd=mirror)
        return sorted(line for line in out.splitlines() if line)

    def paths_of(self, sha: str) -> list[str]:
        """Paths one commit changed (against its first parent; every path of a root commit)."""
        mirror = self.fetch(sha)
        out = self._git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", "-m", "--first-parent",
                        sha, cwd=mirror)
        return sorted({line for line in out.splitlines() if line})

    def is_ancestor(self, old: str, new: str) -> bool:
        mirror = self.fetch(new)
        try:
            self._git("merge-base", "--is-ancestor", old, new, cwd=mirror)
            return True
        except GitError:
            return False

    def on_branch(self, sha: str) -> bool:
        """Whether the branch's head (fetched now) reaches ``sha``: only those commits are released."""
        mirror = self.fetch()
        if not self._has_commit(mirror, sha):
            self.fetch(sha)
        try:
            self._git("merge-base", "--is-ancestor", sha, f"refs/heads/{self.branch}", cwd=mirror)
            return True
        except GitError:
            return False

    def revision_number(self, sha: str) -> int:
        """How many commits the first-parent history up to ``sha`` has: grows with every commit."""
        mirror = self.fetch(sha)
        return int(self._git("rev-list", "--count", "--first-parent", sha, cwd=mirror).strip())

    def read_file(self, sha: str, path: str) -> str:
        """A file's content at a commit (the provisioning script of that very commit)."""
        mirror = self.fetch(sha)
        try:
            return self._git("show", f"{sha}:{path}", cwd=mirror)
        except GitError:
            raise GitError(f"{path} does not exist at commit {sha[:10]} in repository {self.display_url}") from None

    def checkout(self, sha: str, dest: Path) -> Path:
        """A clean working tree of ``sha`` at ``dest`` (replacing whatever was there)."""
        mirror = self.fetch(sha)
        dest = Path(dest)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._git("clone", "--quiet", "--no-checkout", "--shared", str(mirror), str(dest))
        self._git("checkout", "--quiet", "--detach", sha, cwd=dest)
        return dest
