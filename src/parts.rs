//! [`CacheTtl`] and [`CacheTags`] as axum response parts (feature `axum`).
//!
//! A handler returns them next to its body, as it would a header:
//!
//! ```
//! use std::time::Duration;
//! use axum::response::IntoResponse;
//! use cachefence::{CacheTags, CacheTtl};
//!
//! async fn product() -> impl IntoResponse {
//!     (
//!         CacheTtl(Duration::from_secs(5)),
//!         CacheTags(vec!["product:42".into(), "products".into()]),
//!         "product 42",
//!     )
//! }
//! ```

use std::convert::Infallible;

use axum_core::response::{IntoResponseParts, ResponseParts};

use crate::policy::{CacheTags, CacheTtl};

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl IntoResponseParts for CacheTtl {
    type Error = Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Infallible> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl IntoResponseParts for CacheTags {
    type Error = Infallible;

    /// Adds to the tags an earlier part set.
    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Infallible> {
        match res.extensions_mut().get_mut::<CacheTags>() {
            Some(CacheTags(tags)) => tags.extend(self.0),
            None => {
                res.extensions_mut().insert(self);
            }
        }
        Ok(res)
    }
}
