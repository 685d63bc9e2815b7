//! Page-table cursor.
