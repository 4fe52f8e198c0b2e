//! The live web console served at `GET /`: static HTML, CSS and JS compiled into the binary.
//!
//! The console is a single page with no build step. It reads the JSON API under `/api/v1`
//! (polling every two seconds) and draws its charts as SVG in the browser. Everything it
//! shows from the server goes through `textContent` or SVG attributes, never `innerHTML`,
//! and the page runs under [`CONTENT_SECURITY_POLICY`], which forbids inline scripts,
//! inline styles, `eval` and framing.
//!
//! Guarantees: [`asset`] answers only for the fixed set of files below; any other path,
//! including one with `/` or `..`, gets `None`, so nothing is ever read from disk at run time.

/// The Content-Security-Policy header sent with every console response.
///
/// Only the page's own origin may supply scripts, styles, images (plus `data:` URLs for
/// images) and API calls; no plugins, no framing, no `<base>` rewriting, and forms may only
/// post back to the page's origin.
pub(super) const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The console's files: name under `/assets/` (the page itself also at `""`), content type,
/// bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", HTML, include_bytes!("console/index.html")),
    ("app.js", JS, include_bytes!("console/app.js")),
    ("style.css", CSS, include_bytes!("console/style.css")),
];

/// The content type and bytes of the console file named `path`.
///
/// `""` and `"index.html"` are the page; `"app.js"` and `"style.css"` its script and style.
/// Any other name, including one with a directory part, gets `None`.
pub(super) fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let name = if path.is_empty() { "index.html" } else { path };
    ASSETS
        .iter()
        .find(|(file, _, _)| *file == name)
        .map(|(_, content_type, bytes)| (*content_type, *bytes))
}

#[cfg(test)]
mod tests {
    use super::{asset, CONTENT_SECURITY_POLICY};

    #[test]
    fn page_and_its_assets_are_served() {
        let (page_type, page) = asset("").expect("the page at the root");
        assert_eq!(page_type, "text/html; charset=utf-8");
        assert_eq!(asset("index.html").map(|(_, b)| b), Some(page));
        let page = std::str::from_utf8(page).expect("the page is UTF-8");
        for referenced in ["/assets/app.js", "/assets/style.css"] {
            assert!(page.contains(referenced), "page references {referenced}");
            let name = referenced.trim_start_matches("/assets/");
            let (_, bytes) = asset(name).expect("every referenced asset is served");
            assert!(!bytes.is_empty(), "{name} is not empty");
        }
        assert!(asset("app.js").is_some_and(|(t, _)| t.starts_with("text/javascript")));
        assert!(asset("style.css").is_some_and(|(t, _)| t.starts_with("text/css")));
    }

    #[test]
    fn unknown_and_traversing_paths_get_nothing() {
        for path in [
            "missing.js",
            "../Cargo.toml",
            "/app.js",
            "console/app.js",
            ".",
            "app.js/",
        ] {
            assert!(asset(path).is_none(), "{path:?} must not be served");
        }
    }

    #[test]
    fn page_obeys_its_own_policy() {
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(CONTENT_SECURITY_POLICY.contains(directive), "{directive}");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        // The policy forbids inline script, inline style and inline event handlers, so the
        // page must carry none of them.
        let (_, page) = asset("").expect("page");
        let page = std::str::from_utf8(page)
            .expect("UTF-8")
            .to_ascii_lowercase();
        assert!(!page.contains("<script>"), "no inline <script>");
        assert!(!page.contains("<style"), "no <style> element");
        assert!(!page.contains(" style="), "no style attribute");
        assert!(!page.contains("javascript:"), "no javascript: URLs");
        // No inline event handler: no attribute named on<letters>.
        let handler = page.split(|c: char| c.is_whitespace()).find(|word| {
            word.strip_prefix("on").is_some_and(|rest| {
                rest.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphabetic())
                })
            })
        });
        assert_eq!(handler, None, "no inline event handlers");
        let (_, script) = asset("app.js").expect("script");
        let script = std::str::from_utf8(script).expect("UTF-8");
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            ".style.",
        ] {
            assert!(
                !script.contains(forbidden),
                "app.js must not use {forbidden}"
            );
        }
    }
}
