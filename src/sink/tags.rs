//! Where cache tags live in Redis: the plain SET layout and the layouts of Laravel's
//! and Symfony's tagged caches.
//!
//! Pure key arithmetic; the flushing itself is in `redis`.

use crate::rules::template::push_glob_escaped;

/// How a tag's members are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagLayout {
    /// A SET at `key` (with `{tag}` replaced) whose members are full cache keys.
    Set {
        /// Layout with `{tag}`, like `cache_tag:{tag}`.
        key: String,
    },
    /// Laravel 10+: a ZSET `<prefix>tag:<tag>:entries` whose members are item keys
    /// under `prefix`.
    Laravel {
        /// Connection prefix plus cache prefix.
        prefix: String,
    },
    /// Symfony RedisTagAwareAdapter: a SET `<prefix><namespace>:\x01tags\x01<tag>`
    /// (symfony/cache 6.3 and later; `\0tags\0` up to 6.2) whose members are item ids
    /// under `prefix`.
    Symfony {
        /// The Redis client's prefix.
        prefix: String,
        /// The adapter's namespace ("" for none).
        namespace: String,
        /// symfony/cache up to 6.2: tags marked with `\0` instead of `\x01`.
        legacy: bool,
    },
}

impl TagLayout {
    /// The Redis key holding `tag`'s members.
    pub fn tag_key(&self, tag: &str) -> String {
        let (before, after) = self.split();
        format!("{before}{tag}{after}")
    }

    /// The glob matching the keys of every tag matching `tag_glob`.
    pub fn tag_key_pattern(&self, tag_glob: &str) -> String {
        let (before, after) = self.split();
        let mut out = String::new();
        push_glob_escaped(&mut out, &before);
        out.push_str(tag_glob);
        push_glob_escaped(&mut out, &after);
        out
    }

    /// What is prepended to a member to get the cache key it names.
    pub fn member_prefix(&self) -> &str {
        match self {
            TagLayout::Set { .. } => "",
            TagLayout::Laravel { prefix } | TagLayout::Symfony { prefix, .. } => prefix,
        }
    }

    /// The form a misconfigured framework layout would have found instead (Symfony's
    /// other tag marker; Laravel 10's `:` after the prefix, or 11's without), with the
    /// setting that selects it; `None` for the plain set layout.
    pub fn other_form(&self) -> Option<(&'static str, TagLayout, &'static str)> {
        match self {
            TagLayout::Set { .. } => None,
            TagLayout::Symfony {
                prefix,
                namespace,
                legacy,
            } => Some((
                if *legacy { "symfony-legacy" } else { "symfony" },
                TagLayout::Symfony {
                    prefix: prefix.clone(),
                    namespace: namespace.clone(),
                    legacy: !legacy,
                },
                if *legacy {
                    "set [tags] layout = \"symfony\" (symfony/cache 6.3 and later mark tags with \\x01)"
                } else {
                    "set [tags] layout = \"symfony-legacy\" (symfony/cache up to 6.2 marks tags with \\0)"
                },
            )),
            TagLayout::Laravel { prefix } => match prefix.strip_suffix(':') {
                Some(bare) => Some((
                    "laravel",
                    TagLayout::Laravel {
                        prefix: bare.to_owned(),
                    },
                    "remove the ':' at the end of [tags] prefix (Laravel 11 and later join the prefix without one)",
                )),
                None => Some((
                    "laravel",
                    TagLayout::Laravel {
                        prefix: format!("{prefix}:"),
                    },
                    "end [tags] prefix with ':' (Laravel 10 joins the prefix with one)",
                )),
            },
        }
    }

    /// Whether tags are ZSETs (Laravel) rather than SETs.
    pub fn is_zset(&self) -> bool {
        matches!(self, TagLayout::Laravel { .. })
    }

    fn split(&self) -> (String, String) {
        match self {
            TagLayout::Set { key } => {
                let (b, a) = key.split_once("{tag}").unwrap_or((key.as_str(), ""));
                (b.to_owned(), a.to_owned())
            }
            TagLayout::Laravel { prefix } => (format!("{prefix}tag:"), ":entries".to_owned()),
            TagLayout::Symfony {
                prefix,
                namespace,
                legacy,
            } => {
                let ns = if namespace.is_empty() {
                    String::new()
                } else {
                    format!("{namespace}:")
                };
                let mark = if *legacy { '\0' } else { '\x01' };
                (format!("{prefix}{ns}{mark}tags{mark}"), String::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_name_their_keys() {
        let set = TagLayout::Set {
            key: "cache_tag:{tag}".into(),
        };
        assert_eq!(set.tag_key("user:1"), "cache_tag:user:1");
        assert_eq!(set.tag_key_pattern("user:*"), "cache_tag:user:*");
        let laravel = TagLayout::Laravel {
            prefix: "app_cache_".into(),
        };
        assert_eq!(laravel.tag_key("users"), "app_cache_tag:users:entries");
        assert_eq!(laravel.member_prefix(), "app_cache_");
        let symfony = TagLayout::Symfony {
            prefix: "p:".into(),
            namespace: "ns".into(),
            legacy: false,
        };
        assert_eq!(symfony.tag_key("users"), "p:ns:\x01tags\x01users");
        let legacy = TagLayout::Symfony {
            prefix: "p:".into(),
            namespace: "ns".into(),
            legacy: true,
        };
        assert_eq!(legacy.tag_key("users"), "p:ns:\0tags\0users");
        let bare = TagLayout::Symfony {
            prefix: String::new(),
            namespace: String::new(),
            legacy: true,
        };
        assert_eq!(bare.tag_key("t"), "\0tags\0t");
        assert_eq!(symfony.other_form().unwrap().1, legacy);
    }
}
