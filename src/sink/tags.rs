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
    /// Symfony RedisTagAwareAdapter: a SET `<prefix><namespace>:\0tags\0<tag>` whose
    /// members are item ids under `prefix`.
    Symfony {
        /// The Redis client's prefix.
        prefix: String,
        /// The adapter's namespace ("" for none).
        namespace: String,
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
            TagLayout::Symfony { prefix, namespace } => {
                let ns = if namespace.is_empty() {
                    String::new()
                } else {
                    format!("{namespace}:")
                };
                (format!("{prefix}{ns}\0tags\0"), String::new())
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
        };
        assert_eq!(symfony.tag_key("users"), "p:ns:\0tags\0users");
        let bare = TagLayout::Symfony {
            prefix: String::new(),
            namespace: String::new(),
        };
        assert_eq!(bare.tag_key("t"), "\0tags\0t");
    }
}
