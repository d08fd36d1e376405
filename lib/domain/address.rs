use serde::{Deserialize, Serialize};

/// A shipping address, validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub city: String,
    #[serde(default)]
    pub region: Option<String>,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: String,
}

/// What is wrong with an address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct AddressError(pub String);

impl Address {
    /// Checks lengths and the country code, and trims fields.
    pub fn validated(mut self) -> Result<Self, AddressError> {
        for (field, value) in [
            ("name", &mut self.name),
            ("line1", &mut self.line1),
            ("city", &mut self.city),
            ("postalCode", &mut self.postal_code),
        ] {
            *value = value.trim().to_owned();
            if value.is_empty() || value.chars().count() > 200 || !super::is_clean_text(value) {
                return Err(AddressError(format!(
                    "address.{field} must be 1 to 200 characters without control characters"
                )));
            }
        }
        if let Some(region) = self.region.as_mut() {
            *region = region.trim().to_owned();
            if region.chars().count() > 100 || !super::is_clean_text(region) {
                return Err(AddressError(
                    "address.region must be at most 100 characters without control characters"
                        .into(),
                ));
            }
        }
        if self.region.as_deref() == Some("") {
            self.region = None;
        }
        let country = self.country.trim().to_ascii_uppercase();
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(AddressError(
                "address.country must be an ISO 3166-1 alpha-2 code".into(),
            ));
        }
        self.country = country;
        Ok(self)
    }
}
