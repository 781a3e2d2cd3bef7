"""Input checks shared by the metrics that pair predictions with references."""


def check_predictions_references(predictions, references) -> None:
    if predictions is None or references is None:
        raise ValueError("Both `predictions` and `references` are required.")
    if len(predictions) == 0:
        raise ValueError("`predictions` is empty: there is nothing to score.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; they must pair up one to one."
        )
