//! Strict grammars for every user-supplied string of an Ingress that ends up in an nginx config.
//!
//! The operator checks an Ingress before it goes into a plan (and publishes a Warning Event when it
//! fails); the agent checks again before rendering, so a config never holds a string that could
//! end its directive, open a block or name an nginx variable. Nothing is escaped here: a string is
//! accepted as is or rejected.

use crate::plan::{Ingress, IngressBackend, PathType};

/// Why an Ingress cannot be served, naming the field as in the Ingress spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?}: {reason}")]
pub struct IngressError {
    pub field: String,
    pub value: String,
    pub reason: &'static str,
}

const MAX_HOST: usize = 253;
const MAX_PATH: usize = 1024;

fn err(field: impl Into<String>, value: &str, reason: &'static str) -> IngressError {
    let value: String = value.chars().take(80).collect();
    IngressError { field: field.into(), value, reason }
}

fn is_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A lower-case DNS name, optionally with a leading `*.` wildcard label.
pub fn valid_host(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    host.len() <= MAX_HOST && name.split('.').all(is_label)
}

/// `namespace/name` of a Service or Secret (both DNS subdomains).
pub fn valid_object_ref(r: &str) -> bool {
    r.len() <= 507
        && r.split_once('/')
            .is_some_and(|(ns, name)| [ns, name].iter().all(|p| p.len() <= 253 && p.split('.').all(is_label)))
}

/// Characters of a literal path: RFC 3986 path characters minus everything nginx's config
/// grammar gives a meaning to (`;`, quotes, braces, `$`, `#`, `\`, spaces).
fn plain_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._~/%:@!*+,=-".contains(&b)
}

/// A literal path (Exact, Prefix, or ImplementationSpecific without regex).
pub fn valid_plain_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= MAX_PATH && path.bytes().all(plain_path_byte)
}

/// A regex path: the literal characters plus regex operators; `\` only before an operator or a
/// class letter (so `\n`-style escapes nginx would turn into control characters never occur);
/// no braces (`{n}` would open an nginx block) and no quotes. It must parse as a regex without
/// look-around, which PCRE (nginx) and regex-syntax agree on.
pub fn valid_regex_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') || path.len() > MAX_PATH {
        return Err("a path must start with / and be at most 1024 characters");
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            match bytes.get(i + 1) {
                Some(n) if b".()[]?*+|^$/-dwsDWS".contains(n) => i += 2,
                _ => return Err("a backslash may only escape one of .()[]?*+|^$/- or start \\d \\w \\s"),
            }
            continue;
        }
        // `$` only as an anchor (end, or before `)` / `|`): never the start of something nginx
        // could read as a variable.
        if b == b'$' && !matches!(bytes.get(i + 1), None | Some(b')' | b'|')) {
            return Err("`$` may only end the regex or a group or alternative");
        }
        if !(plain_path_byte(b) || b"()|?^$[]".contains(&b)) {
            return Err(
                "a regex path may only hold letters, digits, ._~/%:@!*+,=- and the operators ()|?^$[]\\",
            );
        }
        i += 1;
    }
    let ast =
        regex_syntax::ast::parse::Parser::new().parse(path).map_err(|_| "not a valid regular expression")?;
    if repeats_what_pcre_cannot(&ast) {
        return Err("a quantifier may only follow a character, a class or a group");
    }
    regex_syntax::ParserBuilder::new()
        .build()
        .parse(path)
        .map(|_| ())
        .map_err(|_| "not a valid regular expression")
}

/// regex-syntax accepts a repeated repetition (`a**`, `?*`) and a repeated anchor (`^*`, `\b*`);
/// PCRE refuses both ("quantifier does not follow a repeatable item"), so nginx would not load
/// the config.
fn repeats_what_pcre_cannot(ast: &regex_syntax::ast::Ast) -> bool {
    use regex_syntax::ast::Ast;
    match ast {
        Ast::Repetition(r) => {
            matches!(*r.ast, Ast::Repetition(_) | Ast::Assertion(_)) || repeats_what_pcre_cannot(&r.ast)
        }
        Ast::Group(g) => repeats_what_pcre_cannot(&g.ast),
        Ast::Alternation(a) => a.asts.iter().any(repeats_what_pcre_cannot),
        Ast::Concat(c) => c.asts.iter().any(repeats_what_pcre_cannot),
        _ => false,
    }
}

/// `rewrite-target`: a path with `$1`…`$9` captures and nothing else after a `$`.
pub fn valid_rewrite_target(target: &str) -> bool {
    let bytes = target.as_bytes();
    target.starts_with('/')
        && target.len() <= MAX_PATH
        && bytes.iter().enumerate().all(|(i, &b)| {
            plain_path_byte(b) || (b == b'$' && bytes.get(i + 1).is_some_and(|d| (b'1'..=b'9').contains(d)))
        })
}

/// Whether a path of this Ingress is a regex (ingress-nginx: `use-regex` or `rewrite-target`
/// makes every non-Exact path of the Ingress one).
pub fn is_regex(ingress: &Ingress, path_type: PathType) -> bool {
    (ingress.use_regex || !ingress.rewrite_target.is_empty()) && path_type != PathType::Exact
}

fn check_backend(field: String, backend: Option<&IngressBackend>) -> Result<(), IngressError> {
    match backend {
        Some(b) if !b.service.is_empty() && !valid_object_ref(&b.service) => {
            Err(err(field, &b.service, "not a namespace/name"))
        }
        Some(b) if b.port > 65535 => Err(err(field, &b.port.to_string(), "not a port")),
        _ => Ok(()),
    }
}

/// Checks every string of an Ingress against its grammar; the first failure names the field.
pub fn validate(ingress: &Ingress) -> Result<(), IngressError> {
    let me = format!("{}/{}", ingress.namespace, ingress.name);
    if !valid_object_ref(&me) {
        return Err(err("metadata.name", &me, "not a namespace/name"));
    }
    if !ingress.rewrite_target.is_empty() && !valid_rewrite_target(&ingress.rewrite_target) {
        return Err(err(
            "annotation nginx.ingress.kubernetes.io/rewrite-target",
            &ingress.rewrite_target,
            "must be a path starting with / holding only letters, digits, ._~/%:@!*+,=- and $1…$9",
        ));
    }
    check_backend("spec.defaultBackend".into(), ingress.default_backend.as_ref())?;
    for (i, tls) in ingress.tls.iter().enumerate() {
        if !tls.secret.is_empty() && !valid_object_ref(&tls.secret) {
            return Err(err(format!("spec.tls[{i}].secretName"), &tls.secret, "not a Secret name"));
        }
        for (j, host) in tls.hosts.iter().enumerate() {
            if !valid_host(host) {
                return Err(err(format!("spec.tls[{i}].hosts[{j}]"), host, "not a lower-case DNS name"));
            }
        }
    }
    for (i, rule) in ingress.rules.iter().enumerate() {
        if !rule.host.is_empty() && !valid_host(&rule.host) {
            return Err(err(format!("spec.rules[{i}].host"), &rule.host, "not a lower-case DNS name"));
        }
        for (j, path) in rule.paths.iter().enumerate() {
            let field = format!("spec.rules[{i}].http.paths[{j}]");
            if is_regex(ingress, path.path_type()) {
                valid_regex_path(&path.path)
                    .map_err(|reason| err(format!("{field}.path"), &path.path, reason))?;
            } else if !valid_plain_path(&path.path) {
                return Err(err(
                    format!("{field}.path"),
                    &path.path,
                    "must start with / and hold only letters, digits and ._~/%:@!*+,=-",
                ));
            }
            check_backend(format!("{field}.backend"), path.backend.as_ref())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{IngressPath, IngressRule};

    fn ingress(host: &str, path: &str, path_type: PathType) -> Ingress {
        Ingress {
            namespace: "shop".into(),
            name: "web".into(),
            rules: vec![IngressRule {
                host: host.into(),
                paths: vec![IngressPath { path: path.into(), path_type: path_type as i32, backend: None }],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn hosts_paths_and_annotations_follow_their_grammars() {
        assert!(validate(&ingress("shop.example.com", "/wear", PathType::Prefix)).is_ok());
        assert!(validate(&ingress("*.example.com", "/", PathType::Exact)).is_ok());
        let e = validate(&ingress("shop.example.com", "/a;b{", PathType::Prefix)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.rules[0].http.paths[0].path \"/a;b{\": must start with / and hold only letters, digits and ._~/%:@!*+,=-"
        );
        assert!(validate(&ingress("Shop.example.com", "/", PathType::Prefix)).is_err());
        assert!(validate(&ingress("a.*.com", "/", PathType::Prefix)).is_err());
        assert!(validate(&ingress("x", "/$host", PathType::Prefix)).is_err());

        let mut regex = ingress("x", "/api(/|$)(.*)", PathType::ImplementationSpecific);
        regex.rewrite_target = "/$2".into();
        assert!(validate(&regex).is_ok());
        regex.rules[0].paths[0].path = "/(unclosed".into();
        let e = validate(&regex).unwrap_err();
        assert_eq!(e.reason, "not a valid regular expression");
        regex.rules[0].paths[0].path = "/a{2}".into();
        assert!(validate(&regex).is_err(), "braces never reach the config");
        regex.rules[0].paths[0].path = "/a\\n".into();
        assert!(validate(&regex).is_err(), "nginx would read \\n as a newline");
        regex.rules[0].paths[0].path = "/v\\d+\\.json$".into();
        assert!(validate(&regex).is_ok());
        regex.rules[0].paths[0].path = "/a$b".into();
        assert!(validate(&regex).is_err(), "a `$` inside the regex");
        regex.rules[0].paths[0].path = "/(a|b$)".into();
        assert!(validate(&regex).is_ok());
        // nginx -t refuses these ("quantifier does not follow a repeatable item"); found by the
        // nginx_accepts_every_rendered_config fuzz test.
        for path in ["/?*", "/a**", "/a+?*", "/(^*)", "/a$*", "/\\b*", "/(a|b*+)"] {
            regex.rules[0].paths[0].path = path.into();
            assert!(validate(&regex).is_err(), "{path} must be refused");
        }
        for path in ["/a*?", "/a??", "/(a*)*", "/[?*]", "/(?:a)*"] {
            regex.rules[0].paths[0].path = path.into();
            assert!(validate(&regex).is_ok(), "{path} is a regex nginx loads");
        }
        regex.rewrite_target = "/$host".into();
        assert!(validate(&regex).is_err());
    }

    #[test]
    fn object_refs_are_namespace_slash_name() {
        assert!(valid_object_ref("default/web"));
        assert!(valid_object_ref("default/web.v1"));
        assert!(!valid_object_ref("default/"));
        assert!(!valid_object_ref("web"));
        assert!(!valid_object_ref("a/b/c"));
        assert!(!valid_object_ref("a/b;"));
    }
}
